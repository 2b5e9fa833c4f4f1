"""Benchmarks behind `forge bench NAME`; each module has main(argv) -> int and prints JSON."""

from pathlib import Path
from typing import Any


def phase_params(name: str, params_file: str) -> Any:
    """The ``name`` phase's parameters from ``params_file`` (strict, as the phase itself loads them)."""
    from ..phases import PHASES, get_spec
    from ..phases.base import load_phase_params

    return load_phase_params(get_spec(name), params_file, None, PHASES)[1]


def phase_folder(name: str, folder: str | None) -> Path:
    """``folder``, or the output folder of the newest completed run of phase ``name`` (exits with a clear line
    when there is none)."""
    from .. import paths
    from ..phases import PHASES, get_spec
    from ..phases.base import latest_completed

    if folder:
        return paths.resolve(folder)
    spec = get_spec(name)
    result = latest_completed(PHASES, spec.number)
    if result is None:
        raise SystemExit(f"no completed Phase {spec.number} ({name}) run found: run `make run` first or pass "
                         f"--phase{spec.number} FOLDER")
    return paths.resolve(f"outputs/{result.session}/{spec.dirname}")


def phase_model(folder: Path, role: str = "model", trainable: bool = False):
    """(the causal LM of model ``role`` of the phase run in ``folder`` — a Quiet-STaR wrapper's base —, its
    tokenizer), eval mode."""
    from transformers import AutoTokenizer

    from .. import paths
    from ..results import PhaseResult
    from ..quietstar import base_lm
    from ..modelio import load_lm

    model_dir = paths.resolve(PhaseResult.load(folder).models[role]["path"])
    return base_lm(load_lm(model_dir, trainable=trainable)).eval(), AutoTokenizer.from_pretrained(model_dir)
