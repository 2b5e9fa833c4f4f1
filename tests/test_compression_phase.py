"""Phase 8 on tiny real models: a Phase-7 run (ternary Quiet-STaR model with SVF experts) compressed in stages; the
artifact on disk is the phase's model (it loads, generates, carries the experts, and its bits are its bytes); a
stage that breaks the model or loses more than its allowed loss is rolled back and the next starts from the last
kept plan; the final guard at allowed_loss; tensor groups, plans and the calibration statistics against direct
computations; parameter errors; the scorecard and the chain gate."""
import json

import pytest
import torch

from forgelib import paths
from helpers import SUITE, TINY_GUARD, quietstar_upstream, task_tokenizer

EXPERTS = {"families": ["arith", "multistep"], "levels": [1, 1], "discover_per_family": 12, "k_range": [2, 2],
           "train": {"steps": 2, "batch_size": 4, "max_new_tokens": 8}, "test_per_level": 4, "few_shot": 3,
           "cem": {"iterations": 1, "population": 2, "elite": 1}, "search_budget": 0, "max_new_tokens": 8}
TINY = {"families": ["arith", "multistep"], "levels": [1, 2], "test_per_level": 6, "max_new_tokens": 8,
        "calibration_per_level": 4,
        "stages": [{"name": "pack", "assign": {"ternary": {"codec": "ternary"}}},
                   # a random tiny model knows nothing to lose: this stage's own bound fails by construction
                   {"name": "broken", "assign": {"embeddings": {"codec": "hyper", "n": 8, "index_bits": 2}},
                    "max_ppl_ratio": 0.5, "allowed_loss": 0.3},
                   {"name": "embeddings", "assign": {"embeddings": {"codec": "rtn", "bits": 8, "group": 32}}}],
        "sweep": [{"name": "rtn4", "spec": {"codec": "rtn", "bits": 4, "group": 32}},
                  {"name": "seedlm", "spec": {"codec": "seedlm", "K": 8, "C": 8, "P": 3}}],
        "allowed_loss": 0.5, "max_ppl_ratio": 1.05}
QUIET = {"run": {"quiet": True, "tracking": "jsonl"}, **TINY_GUARD}


@pytest.fixture(scope="module")
def phase7(tmp_path_factory):
    """A Phase-7 folder on a tiny ternary Quiet-STaR model (its result saved as run_phase would)."""
    from forgelib.phases import open_phase

    tmp = tmp_path_factory.mktemp("p8")
    tok = task_tokenizer()
    up = quietstar_upstream(tok, tmp / "baking", "baking", 6, "p8-up")
    (tmp / "up").mkdir()
    up.save(tmp / "up")  # its result.json in a phase folder of its own: the benchmark's fp model
    ctx = open_phase("experts", "parameters/smoke.yaml", {**QUIET, "experts": EXPERTS}, session="p8-7", upstream=up)
    result = ctx.spec.load().run(ctx.params, ctx)
    result.status = "ok"
    result.save(ctx.dir)
    return ctx, result, tmp / "up"


@pytest.fixture(scope="module")
def phase8(phase7):
    from forgelib.phases import open_phase

    ctx = open_phase("compression", "parameters/smoke.yaml", {**QUIET, "compression": TINY}, session="p8-7",
                     upstream=phase7[0].dir)
    result = ctx.spec.load().run(ctx.params, ctx)
    result.status = "ok"
    result.save(ctx.dir)  # as run_phase would (a tiny random model does not pass the gate): the scorecard reads it
    return ctx, result


def test_the_artifact_is_the_phase_model_and_its_bits_are_its_bytes(phase7, phase8):
    from forgelib.experts import load_expert
    from forgelib.quant.artifact import artifact_report, load_extras
    from forgelib.quietstar import QuietStarModel
    from forgelib.modelio import load_lm

    ctx, result = phase8
    folder = paths.resolve(result.models["model"]["path"])
    file = folder / "model.forge"
    on_disk = artifact_report(file)
    m = result.metrics
    assert m["artifact_bytes"] == file.stat().st_size == on_disk["file_bytes"]
    assert m["bits_per_weight"] == pytest.approx(8 * file.stat().st_size / on_disk["weights"], abs=1e-4)
    report = json.loads((ctx.dir / "report.json").read_text())
    final = next(s for s in reversed(report["stages"]) if s["kept"])
    assert (m["acc_input"], m["acc_final"]) == (report["reference"]["acc"], final["acc"])
    assert m["ppl_retention"] == round(report["reference"]["ppl"] / final["ppl"], 4)
    if m["acc_input"]:
        assert m["acc_retention"] == round(final["acc"] / m["acc_input"], 4)
    else:  # a random tiny model answers nothing right: no retention to state
        assert m["acc_retention"] != m["acc_retention"]
    model = load_lm(folder)  # the loader every phase uses reads the artifact folder
    assert isinstance(model, QuietStarModel)
    ids = torch.tensor([[0, 10, 11]])
    assert model.base.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 6)
    # the experts ride in the artifact: the same vectors as Phase 7's files (stored as fp16)
    extras = load_extras(file)
    experts = paths.resolve(phase7[1].artifacts["experts"])
    z0 = load_expert(experts / "expert_0.safetensors")
    for name, z in z0.items():
        assert torch.allclose(extras[f"expert0.{name}"], z.half().float())
    assert "router.centroids" in extras
    # the pipeline's handoff check loads the artifact
    from forgelib.pipeline import validate_handoff
    from forgelib.registry import ModelRegistry

    with ModelRegistry(paths.registry_path()) as reg:
        check = validate_handoff(result, reg)
    assert check["models"]["model"]["ok"] and check["models"]["model"].get("loads")


def test_a_stage_that_breaks_the_model_is_rolled_back(phase8):
    from forgelib.quant.artifact import artifact_report

    ctx, result = phase8
    report = json.loads((ctx.dir / "report.json").read_text())
    stages = {s["name"]: s for s in report["stages"]}
    assert not stages["broken"]["kept"], stages["broken"]["gate"]
    # each stage: the perplexity check, then its guard over the input's whole suite at its allowed loss (the
    # stage's own, else the section's), asked of the artifact read back from disk
    for stage in report["stages"]:
        assert [g["name"] for g in stage["gate"]] == ["ppl_ratio", *(f"keeps_{f}" for f in SUITE)]
        assert stage["kept"] is all(g["passed"] for g in stage["gate"])
        assert {r["family"] for r in stage["guard"]["table"]} == {*SUITE, "all (family mean)"}
        assert stage["guard"]["questions"] == sum(r["n"] for r in stage["guard"]["table"][:-1])
        for g in stage["gate"][1:]:
            row = next(r for r in stage["guard"]["table"] if f"keeps_{r['family']}" == g["name"])
            assert g["value"] == row["lower_bound"] and g["passed"] is (row["verdict"] == "pass")
    assert stages["broken"]["gate"][0]["bound"] == 0.5 and not stages["broken"]["gate"][0]["passed"]
    assert all(g["bound"] == -0.3 for g in stages["broken"]["gate"][1:])
    assert all(g["bound"] == -0.5 for g in stages["pack"]["gate"][1:])
    assert stages["pack"]["kept"] and stages["embeddings"]["kept"]
    assert result.metrics["stages_rolled_back"] == 1 and result.metrics["stages_kept"] == 2
    # the next stage started from the last kept plan: no hyper codec in the final plan or file
    assert all(spec.get("codec") != "hyper" for spec in report["plan"].values())
    final = artifact_report(ctx.dir / "models" / "model" / "model.forge")
    assert "hyper" not in final["weights_per_codec"] and "rtn" in final["weights_per_codec"]
    # the final row is the last kept stage; the gate reads its numbers, and its guard is the phase's guard
    gate = {g.name: g for g in result.gate}
    assert set(gate) == {"final_ppl_ratio", "bits_per_weight", *(f"keeps_{f}" for f in SUITE)}
    assert gate["bits_per_weight"].value == stages["embeddings"]["bits_per_weight"] == result.metrics["bits_per_weight"]
    assert gate["bits_per_weight"].bound == ctx.params.max_bits_per_weight
    assert stages["embeddings"]["acc"] == result.metrics["acc_final"]
    assert gate["final_ppl_ratio"].value == pytest.approx(stages["embeddings"]["ppl"] / report["reference"]["ppl"],
                                                          abs=1e-4)
    guard = json.loads((ctx.dir / "guard.json").read_text())
    assert guard["margin"] == 0.5 and guard["suite"] == SUITE
    assert guard["labels"] == ["phase-7 system", "artifact (embeddings)"]
    assert guard["table"] == stages["embeddings"]["guard"]["table"]
    assert gate["keeps_logic"].bound == -0.5 and gate["keeps_logic"].value == guard["families"]["logic"]["lower"]
    assert {p["name"] for p in report["sweep"]} == {"rtn4", "seedlm"}
    assert not (ctx.dir / "sweep").exists()  # the sweep's files are measured, not kept


def test_measuring_the_loaded_artifact_again_gives_the_reported_numbers(phase8):
    from forgelib.phases.compression import load_system
    from forgelib.quant.artifact import load_extras
    from forgelib.modelio import load_compressed
    from transformers import AutoTokenizer

    ctx, result = phase8
    folder = paths.resolve(result.models["model"]["path"])
    system = load_system(ctx, AutoTokenizer.from_pretrained(folder), ctx.params)
    again = system.from_extras(load_extras(folder / "model.forge")).measure(load_compressed(folder / "model.forge"))
    assert again["acc"] == result.metrics["acc_final"]
    assert again["ppl"] == pytest.approx(result.metrics["ppl_final"], rel=1e-4)


def _row(correct, ppl=2.0):
    return {"correct": list(correct), "acc": sum(correct) / len(correct), "ppl": ppl}


def test_stage_gate_checks_the_perplexity_and_a_stage_guard_rolls_back_a_lost_family():
    """``stage_gate`` is the perplexity check; accuracy is each stage's guard (``StageGuard``: ``forgelib.suite.guard``
    at the stage's allowed loss over the input's suite), as ``run`` decides: a stage that loses a family beyond its
    allowed loss is rolled back, the same stage under a larger stated loss is kept."""
    from forgelib.phases.compression import stage_gate
    from forgelib.suite import GuardParams, guard
    from test_suite import Oracle

    checks = stage_gate(_row([1] * 4, ppl=2.1), _row([1] * 4), 0.10, 1.25, GuardParams())
    assert [c.name for c in checks] == ["ppl_ratio"] and checks[0].passed and checks[0].value == 1.05
    assert not stage_gate(_row([1] * 4, ppl=2.6), _row([1] * 4), 0.10, 1.25, GuardParams())[0].passed
    params = GuardParams(margin=0.1, discordance=0.1, power=0.99)
    suite = {"arith": (1, 2), "logic": (1, 2)}
    lossy = guard(Oracle(["arith", "logic"]), Oracle(["arith", "logic"], forget="logic", share=0.25), suite,
                  params, 0, margin=0.10)
    assert not lossy.passed and not lossy.families["logic"].passed and lossy.families["arith"].passed
    assert all(c.passed for c in guard(Oracle(["arith", "logic"]), Oracle(["arith", "logic"], forget="logic",
                                                                          share=0.25), suite, params, 0,
                                       margin=0.45).checks())


def test_test_questions_are_sized_by_the_allowed_loss():
    import math

    from forgelib.phases.compression import Params, test_per_level
    from forgelib.suite import GuardParams

    guard = GuardParams(discordance=0.1)
    params = Params(families=["arith", "multistep"], levels=(1, 2), allowed_loss=0.2, test_per_level=None)
    assert test_per_level(params, guard) == math.ceil(guard.needed(0.2) / 4)
    assert test_per_level(params, None) == math.ceil(GuardParams().needed(0.2) / 4)
    assert Params().test_per_level == 8  # the default: perplexity and tables only (accuracy is the stages' guards)
    assert test_per_level(Params(test_per_level=7), guard) == 7


def test_tensor_groups_and_plans():
    from transformers import LlamaConfig, LlamaForCausalLM

    from forgelib.quant import convert_to_bitnet
    from forgelib.quant.compress import plan_from, tensor_groups

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    convert_to_bitnet(model)
    groups = tensor_groups(model, {"z": torch.zeros(3)})
    assert groups["model.embed_tokens.weight"] == "embeddings" and "lm_head.weight" not in groups  # tied: once
    assert groups["model.layers.0.self_attn.q_proj.weight"] == "ternary"
    assert groups["model.norm.weight"] == "small" and groups["extra::z"] == "extras"
    plan = plan_from(groups, {"ternary": {"codec": "ternary"}, "*.mlp.*": {"codec": "rtn", "bits": 4}})
    assert plan["model.layers.0.mlp.up_proj.weight"] == {"codec": "rtn", "bits": 4}  # later selectors win
    assert plan["model.layers.0.self_attn.q_proj.weight"] == {"codec": "ternary"}
    with pytest.raises(ValueError, match="matches no tensor"):
        plan_from(groups, {"embedings": {"codec": "rtn"}})
    with pytest.raises(ValueError, match="unknown codec"):
        plan_from(groups, {"small": {"codec": "gzip"}})


def test_input_hessians_are_the_second_moments_of_each_layer_input():
    from transformers import LlamaConfig, LlamaForCausalLM

    from forgelib.quant.compress import input_hessians

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    ids = torch.randint(3, 64, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    h = input_hessians(model, model, [{"input_ids": ids, "attention_mask": mask}],
                       ["model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight"])
    with torch.no_grad():
        final = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    real = final[mask.bool()]  # the head's inputs (the tied embedding's Hessian is the head's)
    assert torch.allclose(h["model.embed_tokens.weight"], real.pow(2).mean(0), atol=1e-5)
    assert h["model.layers.0.mlp.down_proj.weight"].shape == (64,)


@pytest.mark.parametrize("bad, match", [
    ({"stages": []}, "at least one stage"),
    ({"stages": [{"name": "a", "assign": {"ternary": {"codec": "zip"}}}]}, "unknown codec"),
    ({"stages": [{"name": "a", "assign": {}, "bound": 1}]}, "unknown keys"),
    ({"stages": [{"name": "a", "assign": {}}, {"name": "a", "assign": {}}]}, "unique"),
    ({"sweep": [{"name": "x"}]}, "sweep"),
    ({"sweep_targets": ["embedding"]}, "unknown groups"),
    ({"families": ["arithm"]}, "unknown"),
    ({"allowed_loss": 0.0}, "allowed_loss must lie in"),
    ({"allowed_loss": 1.0}, "allowed_loss must lie in"),
    ({"test_per_level": 0}, "test_per_level"),
    ({"sweep_questions": 0}, "sweep_questions"),
    ({"min_acc_retention": 0.5}, "min_acc_retention"),
    ({"gate_z": 1.645}, "gate_z"),
])
def test_parameter_errors_name_what_is_wrong(bad, match):
    from forgelib.phases.compression import Params

    with pytest.raises((ValueError, TypeError), match=match):
        Params(**bad)


def test_bench_compression_runs_both_parts_and_marks_the_front(phase7, tmp_path):
    import yaml

    from forgelib.bench import compression as bench

    params = tmp_path / "tiny.yaml"
    params.write_text(yaml.safe_dump({"compression": {k: v for k, v in TINY.items() if k not in ("stages", "sweep")}}))
    out = tmp_path / "bench.json"
    # the fp part's model: the tiny Quiet-STaR upstream of the Phase-7 run (ternary here: the mechanics are tested)
    assert bench.main(["--phase7", str(phase7[0].dir), "--phase3", str(phase7[2]), "--params", str(params),
                       "--methods", "rtn4", "hqq3", "bfp3.5", "seedlm3.5", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    for part in ("phase7", "fp"):
        rows = {r["name"]: r for r in report[part]["rows"]}
        assert set(rows) == {"raw16", "rtn4", "hqq3", "bfp3.5", "seedlm3.5"}
        assert rows["raw16"]["bits_per_weight"] > rows["rtn4"]["bits_per_weight"] > rows["hqq3"]["bits_per_weight"]
        assert any(r["pareto"] for r in rows.values())
        assert all(r["peak_mb"] >= 0 and r["compress_s"] >= 0 for r in rows.values())
    matched = report["fp"]["matched_bits"][0]
    assert matched["seedlm"] == "seedlm3.5"
    assert abs(matched["bits_per_weight_seedlm3.5"] - matched["bits_per_weight_bfp3.5"]) < 0.05
    assert out.with_suffix(".png").is_file() and not out.with_suffix("").exists()


def test_scorecard_scores_every_model_of_the_session_on_the_same_questions(phase7, phase8):
    from forgelib.quant.artifact import artifact_report
    from forgelib.scorecard import ScorecardParams, scorecard, session_models

    params = ScorecardParams(families=["arith", "multistep"], levels=(1, 1), per_family=3, max_new_tokens=8)
    assert [(e["phase"], e["role"]) for e in session_models("p8-7")] == [("experts", "model"), ("compression", "model")]
    card = scorecard("p8-7", params)
    p7, p8 = card
    assert p7["experts"] == p8["experts"] == phase7[1].metrics["n_experts"]  # both answer routed
    artifact = paths.resolve(phase8[1].models["model"]["path"]) / "model.forge"
    assert p8["bytes"] == artifact.stat().st_size and p8["values"] == artifact_report(artifact)["weights"]
    assert p8["bits_per_value"] == round(8 * p8["bytes"] / p8["values"], 3) and p8["bytes"] < p7["bytes"]
    for row in card:
        assert 0 <= row["accuracy"] <= 1 and row["ppl"] > 1 and row["n"] == 6
        assert row["accuracy"] == pytest.approx((row["acc_arith"] + row["acc_multistep"]) / 2, abs=1e-3)  # 3 + 3
    # the questions: the first of the guard's, per family of the chain's suite (here the Phase-7 input's)
    from forgelib.scorecard import chain_models, chain_suite

    suite, seed = chain_suite(chain_models(phase8[0].dir), ScorecardParams())
    assert suite == {f: tuple(v) for f, v in SUITE.items()} and seed == phase8[0].run.seed + 4242


def test_scorecard_targets_worked_example():
    from forgelib.scorecard import targets

    card = [{"phase": "1 cognate", "model": "trunk", "bytes": 400, "accuracy": 0.9},
            {"phase": "1 cognate", "model": "reasoning", "bytes": 400, "accuracy": 0.5},
            {"phase": "1 cognate", "model": "speed", "bytes": 400, "accuracy": 0.7},
            {"phase": "8 compression", "model": "model", "bytes": 20, "accuracy": 0.7}]
    t = targets(card)
    assert t["smaller_than_one_specialist"] == 20.0 and t["smaller_than_all_specialists"] == 40.0
    assert t["best_specialist"] == "speed" and t["at_least_best_specialist"] is True  # the trunk is not a specialist


def test_playground_traces_the_expert_the_tool_calls_and_the_thoughts(phase7, phase8):
    from forgelib.scorecard import session_models
    from forgelib.viz.playground import phase_playground, trace_answer, trace_lines

    entries = session_models("p8-7")
    artifact = trace_answer(entries[-1], "3+4=", max_new_tokens=6)
    assert isinstance(artifact["text"], str)
    # pass 1's choice: the expert of the nearest centroid, or None for a base centroid (the base model answers)
    from transformers import AutoTokenizer

    from forgelib.experts import SVFConfig, apply_svf
    from forgelib.experts.discover import question_features, route
    from forgelib.experts.train import base_weights
    from forgelib.scorecard import ScorecardParams, measuring_system
    from forgelib.quietstar import base_lm
    from forgelib.modelio import load_lm

    tok = AutoTokenizer.from_pretrained(entries[-1]["path"])
    system = measuring_system(entries[-1], tok, [], ScorecardParams())
    k = phase7[1].metrics["n_experts"]
    assert len(system.experts) == k and system.centroids.shape[0] == k + 1  # + the base centroid of logic
    svf = apply_svf(base_lm(load_lm(entries[-1]["path"])), SVFConfig(**system.svf_config))
    from forgelib.data.tasks import generate

    seen = []
    for question in ["3+4=", "2+2=", *(s.prompt for s in generate("logic", 1, 3, "test", 0))]:
        with base_weights(svf):
            nearest = int(route(question_features(svf, tok, [question]), system.centroids)[0])
        seen.append(trace_answer(entries[-1], question, max_new_tokens=6)["expert"])
        assert seen[-1] == (nearest if nearest < k else None), question
    assert None in seen and any(c is not None for c in seen), seen  # both kinds of centroid were chosen
    thinking = trace_answer(entries[0], "3+4=", max_new_tokens=3, think=True)  # the Phase-7 Quiet-STaR model
    assert thinking["thoughts"] and all(0 <= w <= 1 for _, _, w in thinking["thoughts"])
    assert any("thought" in line for line in trace_lines(thinking))
    box = phase_playground(session="p8-7", question="2+2=")
    c = box.controls
    assert box.last_trace["model"].startswith("8 compression")  # the last model of the chain by default
    c["model"].value = 0
    c["max_tokens"].value = 5
    c["run"].click()
    assert box.last_trace["model"].startswith("7 experts") and "7 experts" in c["out"].value


def test_playground_shows_act_cycles_per_token_of_a_cognate_model(tmp_path):
    from forgelib.models import CognateConfig, CognateForCausalLM
    from forgelib.viz.playground import trace_answer
    from helpers import task_tokenizer

    tok = task_tokenizer()
    torch.manual_seed(0)
    model = CognateForCausalLM(CognateConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, use_act=True, n_cycles=3,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).eval()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    trace = trace_answer({"number": 1, "phase": "cognate", "role": "trunk", "path": tmp_path / "m", "experts": None},
                         "3+4=", max_new_tokens=5)
    answer_ids = tok(trace["text"], add_special_tokens=False).input_ids
    assert trace["act"] is not None and len(trace["act"]) == len(answer_ids)
    assert all(1 <= c <= 3 for _, c in trace["act"])


# --- the chain gate -----------------------------------------------------------------------------------


@pytest.fixture
def chain(tmp_path, monkeypatch):
    """A hand-made two-phase chain: Phase 1's trunk (suite arith, logic) and a later phase's model, each a real tiny
    model folder; ``answers`` decides what each model answers (by its label), so the gate's rule is what is tested."""
    import yaml

    from forgelib.results import PhaseResult
    from forgelib.suite import Asker
    from helpers import tiny_task_llama

    out = tmp_path / "outputs"
    monkeypatch.setenv("FORGE_OUTPUTS", str(out))
    tok = task_tokenizer()
    model = tiny_task_llama(tok)
    guard = {"margin": 0.2, "chain_margin": 0.03, "max_questions": 40}
    folders = {}
    for number, phase, role in ((1, "cognate", "trunk"), (2, "evomerge", "champion")):
        folder = out / "ch" / f"{number:02d}_{phase}"
        model.save_pretrained(folder / "models" / role)
        tok.save_pretrained(folder / "models" / role)
        up = None if number == 1 else {"session": "ch", "phase": "cognate", "folder": str(folders[1])}
        PhaseResult(phase, number, "ch", status="ok", suite=SUITE, upstream=up,
                    models={role: {"path": str(folder / "models" / role), "registry_id": None}}).save(folder)
        (folder / "params.yaml").write_text(yaml.safe_dump({"run": {"seed": 3}, "guard": guard}))
        folders[number] = folder
    answers = {}

    def correct(self, samples):
        return [answers[self.label.split()[-1]](s) for s in samples]

    monkeypatch.setattr(Asker, "correct", correct)
    return folders, answers


def test_chain_gate_passes_when_the_final_model_keeps_what_the_trunk_knew(chain):
    from forgelib.pipeline import check_chain
    from forgelib.scorecard import chain_gate

    folders, answers = chain
    answers.update(trunk=lambda s: 1, champion=lambda s: 1)
    verdict = chain_gate("ch")
    assert verdict["passed"] and verdict["trunk"] == "1 cognate trunk" and verdict["final"] == "2 evomerge champion"
    assert [r["family"] for r in verdict["table"]] == ["arith", "logic", "all (family mean)"]
    assert all(r["n"] == 40 for r in verdict["table"][:2]) and verdict["table"][2]["n"] == 80  # max_questions
    assert verdict["pooled"]["margin"] == 0.03 and verdict["table"][0]["bound"] == -0.2
    assert check_chain(folders[1].parent / "09_scorecard") == json.loads(
        (folders[1].parent / "09_scorecard" / "chain.json").read_text())


def test_chain_gate_fails_on_a_lost_family_and_names_the_phase_that_lost_it(chain):
    from forgelib.pipeline import PipelineError, check_chain
    from forgelib.results import write_json_atomic
    from forgelib.scorecard import chain_gate, chain_message
    from forgelib.stats import noninferior

    folders, answers = chain
    answers.update(trunk=lambda s: 1, champion=lambda s: int(s.family != "logic"))
    # Phase 2's own guard saw logic fall (what guard.json holds)
    write_json_atomic(folders[2] / "guard.json", {"families": {
        "logic": {"before": 1.0, "after": 0.4, "diff": -0.6}, "arith": {"before": 1.0, "after": 1.0, "diff": 0.0}}})
    verdict = chain_gate("ch")
    rows = {r["family"]: r for r in verdict["table"]}
    assert not verdict["passed"] and rows["logic"]["verdict"] == "FAIL" and rows["arith"]["verdict"] == "pass"
    assert rows["logic"]["lower_bound"] == noninferior("logic", [1] * 40, [0] * 40, 0.2).lower
    assert verdict["lost_by"] == {"logic": [{"phase": "2 evomerge", "before": 1.0, "after": 0.4, "diff": -0.6}]}
    message = chain_message(verdict)
    assert "logic: 1.000 → 0.000" in message and "lost in: 2 evomerge 1.00→0.40" in message
    assert "arith" not in message.split("lost in")[0]
    with pytest.raises(PipelineError, match="the chain gate failed: 2 evomerge champion does not answer as well as "
                                            "1 cognate trunk: logic"):
        check_chain(folders[1].parent / "09_scorecard")


def test_chain_gate_holds_all_families_pooled_to_the_tighter_chain_margin(chain):
    from forgelib.scorecard import chain_gate, chain_message
    from forgelib.stats import noninferior_over

    _, answers = chain
    lost = {}

    def champion(sample):  # loses the first 2 questions of each family: -0.05, within the per-family margin 0.2
        lost[sample.family] = lost.get(sample.family, 0) + 1
        return int(lost[sample.family] > 2)

    answers.update(trunk=lambda s: 1, champion=champion)
    verdict = chain_gate("ch")
    rows = {r["family"]: r for r in verdict["table"]}
    assert rows["arith"]["verdict"] == rows["logic"]["verdict"] == "pass"
    lost_two = ([1] * 40, [0, 0] + [1] * 38)
    pooled = noninferior_over("all", {"arith": lost_two, "logic": lost_two}, 0.03)
    assert verdict["pooled"]["lower"] == pooled.lower < -0.03 and not verdict["passed"]
    assert rows["all (family mean)"]["verdict"] == "FAIL" and rows["all (family mean)"]["bound"] == -0.03
    assert set(verdict["lost_by"]) == {"arith", "logic"}  # no family failed: those that fell at all
    assert "all (family mean): 1.000 → 0.950" in chain_message(verdict)


def test_chain_gate_without_a_phase1_trunk_says_so(chain):
    import shutil

    from forgelib.scorecard import chain_gate

    folders, _ = chain
    shutil.rmtree(folders[1] / "models")
    (folders[1] / "result.json").unlink()  # the chain now starts at Phase 2
    with pytest.raises(ValueError, match="no Phase-1 trunk"):
        chain_gate(folder=folders[2])
