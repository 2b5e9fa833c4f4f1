"""Test phase 2: load alpha's model (checksum-verified), nudge it, save it; can be told to fail or wait."""
import dataclasses
import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from forgelib.results import GateCheck


@dataclasses.dataclass
class Params:
    scale: float = 1.01
    """multiply every weight by this"""
    fail_gate: bool = False
    """make the gate fail (to test that a failing phase stops the pipeline)"""


def run(params, ctx):
    model = AutoModelForCausalLM.from_pretrained(ctx.upstream_model_path())
    # The kill-and-resume test holds this phase here while a marker file exists.
    marker = Path(os.environ.get("FORGE_TEST_HOLD", "/nonexistent"))
    (ctx.dir / "started").write_text("1")
    while marker.exists():
        time.sleep(0.2)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(params.scale)
    ctx.log({"scale": params.scale}, step=0)
    ctx.save_model("model", model)
    ctx.result.metrics["scale"] = params.scale
    ctx.result.gate.append(GateCheck("gate_ok", 0.0 if params.fail_gate else 1.0, 1.0, ">="))
    return ctx.result
