"""`forge bench finetune`: full against LoRA fine-tuning of Phase 1's trunk, side by side on the same batches."""
from __future__ import annotations

import json
import re

import pytest

from forgelib.bench import finetune, phase_params

PROJECTION = re.compile(r"layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$")


def test_both_arms_take_the_same_batches_from_the_same_start_and_count_what_they_train(tmp_path, monkeypatch):
    """On the smoke set's (random) trunk with the memory stage: the LoRA arm trains r·(in + out) weights per
    projection plus the memory and the halting head (counted here from the trunk's own modules), the full arm every
    weight; both start from the same function on the same first batch (equal first loss: the adapter starts at 0)
    and then part; every timed step is reported, the ratio is that of the medians; the CLI writes the JSON."""
    import torch

    from forgelib.phases import cognate

    monkeypatch.setenv("FORGE_OUTPUTS", str(tmp_path))
    params = phase_params("cognate", "parameters/smoke.yaml")
    out = finetune.measure(params, "memory", 4, rounds=4, warmup=1)
    trunk = cognate.make_trunk(params, cognate.build_tokenizer(params, 0, tmp_path / "tok"), 0)
    adapters = sum(4 * (m.in_features + m.out_features) for name, m in trunk.named_modules()
                   if isinstance(m, torch.nn.Linear) and PROJECTION.search(name))
    full_trained = sum(p.numel() for n, p in trunk.named_parameters() if "self_attn.memory." in n or "halt_head." in n)
    assert out["arms"]["lora"]["trainable_parameters"] == adapters + full_trained
    assert out["arms"]["full"]["trainable_parameters"] == out["parameters"] == sum(p.numel() for p in
                                                                                  trunk.parameters())
    full, lora = out["arms"]["full"], out["arms"]["lora"]
    assert len(full["seconds"]) == len(lora["seconds"]) == 3 and len(full["losses"]) == 4
    assert full["losses"][0] == pytest.approx(lora["losses"][0], abs=1e-4)
    assert full["losses"][1:] != lora["losses"][1:]
    assert out["full_over_lora_seconds"] == round(full["median_seconds"] / lora["median_seconds"], 3)
    with pytest.raises(ValueError, match="warmup < rounds"):
        finetune.measure(params, "speed", 2, rounds=2, warmup=2)

    assert finetune.main(["--params", "parameters/smoke.yaml", "--stage", "speed", "--lora-r", "2", "--rounds", "2",
                          "--out", str(tmp_path / "ft.json")]) == 0
    written = json.loads((tmp_path / "ft.json").read_text())
    assert written["benchmark"] == "finetune" and written["lora_r"] == 2 and written["stage"] == "speed"
    with pytest.raises(SystemExit, match="--stage must be one of reasoning, memory, speed"):
        finetune.main(["--params", "parameters/smoke.yaml", "--stage", "trunk"])
