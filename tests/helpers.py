"""Small helpers shared by several test files."""
import copy
import os
from pathlib import Path

import pytest
import torch


def perturbed_copy(model, seed: int, scale: float = 0.05):
    """A copy of ``model`` with every parameter nudged by seeded noise (a 'fine-tuned' child of the trunk)."""
    child = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in child.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return child


TESTS_DIR = str(Path(__file__).parent)


@pytest.fixture
def pipeline_outputs(tmp_path, monkeypatch):
    """Fresh outputs root per test; the kernels papermill starts find the test phases (tests/pipeline_phases)
    on PYTHONPATH."""
    out = tmp_path / "outputs"
    monkeypatch.setenv("FORGE_OUTPUTS", str(out))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")]))
    return out


PIPELINE_PARAMS = "tests/params/pipeline.yaml"
"""The parameter file of the pipeline's own test phases (tests/pipeline_phases: 01_alpha, 02_beta)."""


@pytest.fixture(name="outputs")
def outputs_of_test_phases(pipeline_outputs, monkeypatch):
    """``outputs``: a fresh outputs root; the CLI's pipeline runs the test phases (tests/pipeline_phases) instead of
    the product's."""
    from pipeline_phases import ALL

    monkeypatch.setattr("forgelib.pipeline.PHASES", ALL)
    return pipeline_outputs


@pytest.fixture(name="done")
def completed_r1(outputs):
    """``done``: session ``r1`` with both test phases completed with the parameter file's values (in this process,
    no notebooks); the outputs root."""
    from forgelib.pipeline import run_pipeline
    from pipeline_phases import ALL

    outcomes = run_pipeline(PIPELINE_PARAMS, session="r1", specs=ALL, log=lambda m: None, notebooks=False)
    assert [o.status for o in outcomes] == ["completed", "completed"]
    return outputs


def task_tokenizer(extra_texts=()):
    """A real tokenizer (vocab 300, the project's special tokens) trained on worked solutions of every family."""
    from forgelib.data.tasks import build_mix, format_sample, suite_families
    from forgelib.data.tokenizer import train_tokenizer

    mix = {f: 1 for f in suite_families()}
    texts = [format_sample(s, with_steps=True) for s in build_mix(mix, (1, 3), 300, "train", 0)]
    return train_tokenizer(texts + list(extra_texts), vocab_size=300)


def tiny_task_llama(tok):
    """A seeded 2-layer LlamaForCausalLM (hidden 32) fitting ``tok``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))


SUITE = {"arith": [1, 1], "logic": [1, 1]}
"""The suite a hand-made upstream result hands on (``PhaseResult.suite``): what the next phase's guard asks."""
TINY_GUARD = {"guard": {"margin": 0.5, "max_questions": 16}}
"""Overrides that keep a phase's guard to a few questions per family (8 at first, at most 16)."""


def quietstar_upstream(tok, folder, phase: str, number: int, session: str, ternary: bool = True,
                       packing: str | None = None, suite: dict | None = None):
    """A Quiet-STaR tiny Llama (ternary layers unless ``ternary=False``; packed with ``packing``) saved in ``folder``
    and registered as ``phase``'s model: the PhaseResult a later phase takes as ``upstream``, with ``suite``
    (default ``SUITE``) as what the model knows (a hand-made chain has no Phase 1 to take it from)."""
    from forgelib import paths
    from forgelib.quant import convert_to_bitnet
    from forgelib.registry import ModelRegistry
    from forgelib.results import PhaseResult
    from forgelib.quietstar import QuietStarConfig, QuietStarModel

    qs = QuietStarModel(tiny_task_llama(tok), tok, QuietStarConfig(n_thought=2))
    if ternary:
        convert_to_bitnet(qs.base)
    qs.export_packing = packing
    qs.save_pretrained(folder)
    tok.save_pretrained(folder)
    up = PhaseResult(phase, number, session, status="ok", suite={f: list(v) for f, v in (suite or SUITE).items()})
    with ModelRegistry(paths.registry_path()) as reg:
        up.models["model"] = {"path": str(folder), "registry_id": reg.register_model(
            session_id=session, phase_name=phase, model_name="model", model_path=str(folder))}
    return up
