"""Root pytest set-up, shared by the unit tests and nbval's notebook runs.

Tests never write into the user's home or the repository's outputs/: W&B is disabled, and every cache and
output folder points into one temporary directory (unless the caller set them).
"""
import os
import tempfile

_TMP = tempfile.mkdtemp(prefix="forge-tests-")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("FORGE_OUTPUTS", os.path.join(_TMP, "outputs"))
for _var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "HF_HOME", "MPLCONFIGDIR"):
    os.environ.setdefault(_var, os.path.join(_TMP, _var.lower()))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The pipeline notebook runs the whole smoke chain, each phase in its own notebook: tests/test_phases.py executes it
# with papermill (every cell of the pipeline notebook and of notebooks 01-09, as committed, with the chain's
# parameters injected; a failing cell fails the test), checks that every cell of each ran, and checks what each phase
# handed on. nbval would run notebooks 00-08 a second time as a second smoke chain (~9 min), and the scorecard on
# whatever chain ended last among the tests' sessions, so it leaves them to that test and runs the benchmark notebooks.
collect_ignore = ["outputs", ".venv", "notebooks/00_pipeline.ipynb",
                  *(f"notebooks/{name}.ipynb" for name in ("01_cognate", "02_evomerge", "03_quietstar", "04_bitnet",
                                                            "05_curriculum", "06_baking", "07_experts",
                                                            "08_compression", "09_scorecard"))]
collect_ignore_glob = ["tests/notebooks/*.ipynb", "outputs/*"]
