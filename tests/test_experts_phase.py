"""Phase 7 on tiny real models: a run end to end on a ternary Quiet-STaR upstream (experts saved as small files
next to the model that reload to the same z, the handed-on model unchanged, every metric the issue names)."""
import json

import pytest
import torch

from forgelib import paths
from helpers import quietstar_upstream, task_tokenizer


@pytest.fixture(scope="module")
def tok():
    return task_tokenizer()


def _upstream(tok, tmp_path, ternary=True):
    folder = tmp_path / "baking"
    return quietstar_upstream(tok, folder, "baking", 6, "ex", ternary=ternary), folder


TINY = {"families": ["arith", "multistep"], "levels": [1, 1], "discover_per_family": 12, "k_range": [2, 3],
        "train": {"steps": 2, "batch_size": 4, "max_new_tokens": 8}, "test_per_level": 4, "few_shot": 3,
        "cem": {"iterations": 2, "population": 3, "elite": 1}, "search_budget": 2, "search_per_family": 2,
        "max_new_tokens": 8}


@pytest.mark.parametrize("ternary", [True, False], ids=["ternary", "llama"])
def test_phase_runs_end_to_end_and_saves_experts(tok, tmp_path, ternary):
    from forgelib.experts import apply_svf, load_expert
    from forgelib.phases import open_phase
    from forgelib.thoughts import load_quietstar

    up, folder = _upstream(tok, tmp_path, ternary)
    ctx = open_phase("experts", "parameters/smoke.yaml", {"run": {"quiet": True, "tracking": "jsonl"},
                                                          "experts": TINY}, session=f"ex-{ternary}", upstream=up)
    result = ctx.spec.load().run(ctx.params, ctx)
    for key in ("acc_base", "acc_routed", "acc_oracle", "routing_acc", "n_experts", "expert_params"):
        assert key in result.metrics, key
    k = result.metrics["n_experts"]
    assert 2 <= k <= 3 and result.metrics["acc_oracle"] >= result.metrics["acc_routed"]
    report = json.loads((ctx.dir / "report.json").read_text())
    assert sum(sum(v) for v in report["discovery"].values()) == 12 * 2
    experts = paths.resolve(result.artifacts["experts"])
    files = sorted(p.name for p in experts.glob("expert_*.safetensors"))
    assert files == [f"expert_{c}.safetensors" for c in range(k)]
    # an expert file is small: one float per singular value of every adapted matrix
    assert (experts / files[0]).stat().st_size < 4 * result.metrics["expert_params"] + 4096
    handed = load_quietstar(paths.resolve(result.models["model"]["path"]))
    original = load_quietstar(folder)
    ids = torch.randint(5, 200, (1, 7))
    assert torch.equal(handed.base(input_ids=ids).logits, original.base(input_ids=ids).logits)  # z lives in files
    svf = apply_svf(handed.base)
    svf.load_z(load_expert(experts / files[0]))
    assert svf.expert_params == result.metrics["expert_params"]
    assert set(report["scalings"]) == {f"expert_{c}" for c in range(k)}


def test_bench_experts_runs_every_arm(tok, tmp_path):
    import yaml

    from forgelib.bench import experts as bench
    from forgelib.phases import open_phase

    up, _ = _upstream(tok, tmp_path)
    ctx = open_phase("experts", "parameters/smoke.yaml", {"run": {"quiet": True, "tracking": "jsonl"},
                                                          "experts": TINY}, session="ex-bench", upstream=up)
    result = ctx.spec.load().run(ctx.params, ctx)
    result.save(ctx.dir)  # what run_phase writes (a tiny random model does not pass the smoke gate)
    params = tmp_path / "tiny.yaml"
    params.write_text(yaml.safe_dump({"experts": TINY}))
    out = tmp_path / "bench.json"
    assert bench.main(["--phase7", str(ctx.dir), "--params", str(params), "--seeds", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    summary = report["summary"]
    assert {"base", "svf", "lora_matched", "lora_r16"} <= set(summary) and len(report["per_seed"]) == 2
    svf, matched = summary["svf"]["params_per_expert"], summary["lora_matched"]["params_per_expert"]
    from forgelib.bench import phase_model
    from forgelib.bench.experts import lora_cost

    assert matched == lora_cost(phase_model(ctx.dir)[0], summary["lora_matched"]["targets"], 1)
    assert summary["lora_r16"]["params_per_expert"] > 10 * svf and abs(matched - svf) <= svf
    assert "oracle" in summary["svf"] and "routing_acc" in summary["svf"] and "unseen" in summary["svf"]
