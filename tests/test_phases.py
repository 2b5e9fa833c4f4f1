"""The pipeline notebook runs every phase for real on the smoke set (one shared session); each phase hands on
what it promises; bad input is refused clearly."""
import json
import math
import subprocess
import sys

import pytest
import torch

from forgelib import paths
from forgelib.models import CognateConfigError
from forgelib.params import ParameterError
from forgelib.phases import UpstreamError, open_phase, run_phase
from forgelib.registry import ModelRegistry
from forgelib.results import PhaseResult

QUIET = {"run": {"quiet": True, "tracking": "jsonl"}}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    out = tmp_path_factory.mktemp("phase-outputs")
    mp = pytest.MonkeyPatch()
    mp.setenv("FORGE_OUTPUTS", str(out))
    yield out
    mp.undo()


@pytest.fixture(scope="module")
def pipeline(outputs):
    """The pipeline notebook itself, executed by papermill on the smoke set as session "p": every phase runs for
    real, in its own kernel, and the tests below check what each handed on. (nbval leaves this notebook to this
    fixture, see ../conftest.py: one smoke chain instead of two.)"""
    from forgelib.notebooks import execute

    out = execute(paths.repo_root() / "notebooks" / "00_pipeline.ipynb", outputs / "00_pipeline.ipynb",
                  {"params_file": "parameters/smoke.yaml", "session": "p", "overrides": QUIET})
    return out


def _completed(name):
    """(a context-like record: dir, seed, params; the PhaseResult) of phase ``name`` in the pipeline's session."""
    from types import SimpleNamespace

    from forgelib.phases import PHASES, get_spec
    from forgelib.phases.base import load_phase_params

    spec = get_spec(name)
    folder = paths.outputs_root() / "p" / spec.dirname
    run, params = load_phase_params(spec, "parameters/smoke.yaml", QUIET, PHASES)
    return SimpleNamespace(dir=folder, seed=run.seed + 1000 * spec.number, params=params, spec=spec), \
        PhaseResult.load(folder)


@pytest.fixture(scope="module")
def cognate(pipeline):
    return _completed("cognate")


@pytest.fixture(scope="module")
def evomerge(pipeline):
    return _completed("evomerge")


@pytest.fixture(scope="module")
def quietstar(pipeline):
    return _completed("quietstar")


@pytest.fixture(scope="module")
def bitnet(pipeline):
    return _completed("bitnet")


@pytest.fixture(scope="module")
def curriculum(pipeline):
    return _completed("curriculum")


@pytest.fixture(scope="module")
def baking(pipeline):
    return _completed("baking")


@pytest.fixture(scope="module")
def experts(pipeline):
    return _completed("experts")


@pytest.fixture(scope="module")
def compression(pipeline):
    return _completed("compression")


@pytest.mark.slow
def test_pipeline_notebook_completes_every_phase(pipeline):
    import nbformat

    from forgelib.phases import PHASES

    nb = nbformat.read(pipeline, as_version=4)
    assert all(c.get("outputs") is not None for c in nb.cells if c.cell_type == "code")
    assert not any(o.get("output_type") == "error" for c in nb.cells if c.cell_type == "code" for o in c["outputs"])
    for spec in PHASES:
        result = PhaseResult.load(paths.outputs_root() / "p" / spec.dirname)
        assert result.ok and result.gate_passed, spec.name
        assert (paths.outputs_root() / "p" / spec.dirname / spec.notebook.split("/")[-1]).is_file()
    # the last step: the scorecard over every phase's model
    card = nbformat.read(paths.outputs_root() / "p" / "09_scorecard" / "09_scorecard.ipynb", as_version=4)
    outputs = [o for c in card.cells if c.cell_type == "code" for o in c["outputs"]]
    assert outputs and not any(o.get("output_type") == "error" for o in outputs)
    assert any("8 compression" in str(o.get("data", {}).get("text/plain", "")) for o in outputs)


@pytest.mark.slow
def test_cognate_hands_on_trunk_specialists_and_tokenizer(cognate):
    from forgelib.models.loading import load_cognate
    from transformers import AutoTokenizer

    ctx, result = cognate
    assert result.ok and result.gate_passed
    assert set(result.models) == {"tokenizer", "trunk", "reasoning", "memory", "speed"}
    shapes = {}
    for role in ("trunk", "reasoning", "memory", "speed"):
        model = load_cognate(paths.resolve(result.models[role]["path"]))
        shapes[role] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert model.config.model_type == "cognate"
    assert all(s == shapes["trunk"] for s in shapes.values()), "identical shapes so Phase 2 can merge them"
    assert load_cognate(paths.resolve(result.models["reasoning"]["path"])).config.n_cycles == 2
    assert load_cognate(paths.resolve(result.models["memory"]["path"])).config.use_memory
    tok = AutoTokenizer.from_pretrained(paths.resolve(result.models["tokenizer"]["path"]))
    assert tok.convert_tokens_to_ids("<|startofthought|>") != tok.unk_token_id
    report = json.loads((ctx.dir / "report.json").read_text())
    for name in ("trunk", "reasoning", "memory", "speed"):
        assert set(report["models"][name]["accuracy"]) >= {"recall", "multistep", "arith"}
    # the gate's numbers are the report's numbers
    gate = {g.name: g.value for g in result.gate}
    fams = ["multistep", "algebra"]
    own = lambda m, key: sum(report["models"][m][key][f] for f in fams) / 2  # noqa: E731
    acc_gain = own("reasoning", "accuracy") - own("trunk", "accuracy")
    nll_gain = own("trunk", "answer_nll") - own("reasoning", "answer_nll")
    # accuracy decides; the NLL term is smaller than one test sample's share of accuracy
    assert gate["reasoning_accuracy_gain_over_trunk"] == pytest.approx(acc_gain, abs=1e-3)
    assert gate["reasoning_accuracy_gain_over_trunk"] == pytest.approx(acc_gain + 1e-3 * math.tanh(nll_gain))
    assert set(report["chance"]) == set(report["models"]["trunk"]["accuracy"])
    assert report["chance"]["logic"] > 0.3 and report["chance"]["arith"] < 0.05  # T/F vs a sum
    assert report["histories"]["trunk"]["padding_fraction"] < 0.2  # length bucketing
    assert gate["min_disagreement"] == pytest.approx(min(report["disagreement"].values()))
    assert result.metrics["trunk_loss_last"] < result.metrics["trunk_loss_first"]
    rows = [json.loads(l) for l in (ctx.dir / "metrics.jsonl").read_text().splitlines()]
    assert any("trunk/loss" in r for r in rows) and any("speed/loss" in r for r in rows)


@pytest.mark.slow
def test_registry_holds_phase_rows(cognate):
    with ModelRegistry(paths.registry_path()) as reg:
        roles = {m["model_name"] for m in reg.list_models(session_id="p", phase_name="cognate")}
        assert roles == {"tokenizer", "trunk", "reasoning", "memory", "speed"}
        assert reg.list_phase_runs("p")[0]["status"] == "completed"


@pytest.mark.slow
def test_evomerge_champion_beats_parents_and_rebuilds_bit_exactly(evomerge):
    ctx, result = evomerge
    assert result.ok and result.gate_passed
    report = json.loads((ctx.dir / "report.json").read_text())
    from forgelib.phases.evomerge import best_row, paired_se, ranks_at_least

    test = report["test"]
    assert list(test)[0] == "trunk"  # the trunk is a contender
    z = report["gate_z"]
    for other in ("trunk", "uniform_merge", best_row(test, ["reasoning", "memory", "speed"])):
        champ, row = test["champion"], test[other]
        # not measurably worse: within gate_z paired standard errors in accuracy, the NLL on an exact tie
        assert champ["accuracy"] - row["accuracy"] >= -z * paired_se(champ, row)
        assert champ["accuracy"] != row["accuracy"] or ranks_at_least(champ, row)
    assert report["champion_source"] in ("trunk", "reasoning", "memory", "speed", "merge")
    assert result.metrics["champion_above_all"] == all(
        test["champion"]["accuracy"] > test[n]["accuracy"] for n in ("trunk", "reasoning", "memory", "speed"))
    assert len(report["evolution"]["evaluations"]) == 40
    recipe = paths.resolve(result.artifacts["recipe"])
    out = ctx.dir / "rebuilt"
    proc = subprocess.run([sys.executable, "-m", "forgelib.cli", "merge", str(recipe), "--out", str(out),
                           "--compare", str(paths.resolve(result.models["champion"]["path"]))],
                          capture_output=True, text=True, cwd=paths.repo_root())
    assert proc.returncode == 0, proc.stderr
    assert "bit-identical" in proc.stdout and "True" in proc.stdout


@pytest.mark.slow
def test_quietstar_hands_on_a_thinking_model_and_reports_the_ablation(quietstar, evomerge):
    """Phase 3 on the smoke set: the gate's numbers are the report's, the model reloads with its thoughts and
    as a plain HF model, and the Phase-2 model row is the upstream champion measured afresh."""
    from transformers import AutoTokenizer

    from forgelib.evaluate import mean_nll
    from forgelib.models.loading import load_causal_lm
    from forgelib.phases.quietstar import Params, test_samples
    from forgelib.thoughts import QuietStarModel, load_quietstar

    ctx, result = quietstar
    assert result.ok and result.gate_passed
    report = json.loads((ctx.dir / "report.json").read_text())
    test = report["test"]
    assert set(test) == {"base", "thoughts", "no_thoughts"}  # the pause arm is off at smoke (the Llama test runs it)
    for key in ("thoughts", "base", "no_thoughts"):
        assert result.metrics[f"acc_{key}"] == round(test[key]["accuracy"], 4)
        assert result.metrics[f"nll_{key}"] == round(test[key]["answer_nll"], 4)
    gate = {g.name: g for g in result.gate}
    assert gate["nll_no_thoughts_minus_nll_thoughts"].value == pytest.approx(
        test["no_thoughts"]["answer_nll"] - test["thoughts"]["answer_nll"])
    assert gate["acc_thoughts_minus_acc_base"].value == pytest.approx(
        test["thoughts"]["accuracy"] - test["base"]["accuracy"])
    # the curves start at the Phase-2 model, where thinking and not thinking are the same (w = 0)
    for arm in ("thoughts",):
        first = report["training"][arm]["evals"][0]
        assert first["step"] == 0 and first["nll_thoughts"] == pytest.approx(first["nll_no_thoughts"], abs=1e-6)
    assert len(report["heatmap"]) == 4 and all(0 <= w <= 1 for r in report["heatmap"] for w in r["weights"])
    folder = paths.resolve(result.models["model"]["path"])
    model = load_quietstar(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    params = Params()
    samples = test_samples(params, ctx.seed + 1)[:12]
    plain = load_causal_lm(folder)  # the base weights are a normal HF folder
    with model.no_thoughts():
        assert mean_nll(model, tok, samples, max_len=96, answer_only=True, with_steps=True) == pytest.approx(
            mean_nll(plain, tok, samples, max_len=96, answer_only=True, with_steps=True))
    # the base row is the upstream champion itself
    champion = load_causal_lm(paths.resolve(evomerge[1].models["champion"]["path"]))
    untrained = QuietStarModel(champion, tok)
    assert mean_nll(untrained, tok, samples, max_len=96, answer_only=True, with_steps=True) == pytest.approx(
        mean_nll(champion, tok, samples, max_len=96, answer_only=True, with_steps=True), abs=1e-6)


@pytest.mark.slow
def test_quietstar_refuses_the_titans_memory_clearly(outputs, evomerge):
    overrides = {**QUIET, "quietstar": {"runtime": {"use_memory": True}, "steps": 2}}
    ctx = open_phase("quietstar", "parameters/smoke.yaml", overrides, session="qm", upstream=evomerge[0].dir)
    with pytest.raises(Exception, match="use_memory=False"):
        run_phase(ctx)


@pytest.mark.slow
def test_bench_quietstar_counts_equal_compute(evomerge, tmp_path):
    from forgelib.bench import quietstar as bench

    out = tmp_path / "qs.json"
    assert bench.main(["--phase2", str(evomerge[0].dir), "--seeds", "2", "--steps", "2", "--test-per-family", "2",
                       "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    steps = report["equal_compute"]["steps"]
    assert steps == {"plain": 32, "quietstar": 2, "pause": 4, "random": 4}  # smoke: 2 passes x (1+4+1+2) = 16
    for row in report["per_seed"]:
        tokens = {arm: row[arm]["forward_tokens"] for arm in bench.ARMS}
        # measured forward tokens: the thinking arms spend the same within batch-length noise, plain too
        assert max(tokens.values()) / min(tokens.values()) < 1.6
    assert set(report["quietstar_gain"]) == {"over_plain", "over_pause", "over_random"}
    assert report["accuracy"]["quietstar"]["n"] == 2


@pytest.mark.slow
def test_bitnet_hands_on_a_packed_ternary_thinking_model(bitnet, quietstar):
    """Phase 4 on the smoke set: ternary layers packed on disk, the bytes counted, the gate's numbers the
    report's, and the model loads both for packed inference and as trainable BitLinear layers (Phase 5)."""
    from forgelib.quant import bitlinear_modules, packed_bitlinear_modules
    from forgelib.thoughts import load_quietstar

    ctx, result = bitnet
    assert result.ok and result.gate_passed
    report = json.loads((ctx.dir / "report.json").read_text())
    m = result.metrics
    assert m["acc_fp"] == round(report["test"]["fp"]["accuracy"], 4)
    assert report["upstream_model"] == str(paths.resolve(quietstar[1].models["model"]["path"]))
    assert m["acc_retention"] == pytest.approx(report["test"]["ternary"]["accuracy"] / report["test"]["fp"]["accuracy"],
                                               abs=1e-4)
    assert m["ppl_ratio"] == pytest.approx(math.exp(report["test"]["ternary"]["answer_nll"]
                                                    - report["test"]["fp"]["answer_nll"]), rel=1e-3)
    folder = paths.resolve(result.models["model"]["path"])
    assert m["total_bytes_packed"] == sum((folder / f).stat().st_size
                                          for f in ("model.safetensors", "quietstar.safetensors"))
    assert report["export"]["file_bytes"] == (folder / "model.safetensors").stat().st_size
    assert report["sizes"]["base3"]["total_bytes"] < report["sizes"]["2bit"]["total_bytes"] < \
        report["sizes"]["fp16"]["total_bytes"] < report["sizes"]["fp32"]["total_bytes"] == m["total_bytes_fp32"]
    packed = load_quietstar(folder)
    assert len(packed_bitlinear_modules(packed.base)) == 14 and not bitlinear_modules(packed.base)
    assert len(bitlinear_modules(load_quietstar(folder, trainable=True).base)) == 14
    shares = report["ternary_share"]["qat"]
    assert all(abs(sum(v[k] for k in ("-1", "0", "+1")) - 1) < 1e-9 for v in shares.values())


@pytest.mark.slow
def test_bench_bitnet_runs_every_arm(quietstar, tmp_path):
    from forgelib.bench import bitnet as bench

    out = tmp_path / "bn.json"
    assert bench.main(["--phase3", str(quietstar[0].dir), "--seeds", "2", "--steps", "3", "--test-per-family", "2",
                       "--speed-repeats", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["acc_retention"]) == {"qat_distill", "qat_no_distill"}
    assert report["acc_retention"]["qat_distill"]["n"] == 2
    assert report["tokens_per_s"]["packed"] > 0 and report["tokens_per_s"]["fp32"] > 0
    assert set(report["sizes"]) == {"fp32", "fp16", "2bit", "base3"}


@pytest.mark.slow
def test_curriculum_trains_the_ternary_model_and_learns_the_calculator(curriculum, bitnet):
    """Phase 5 on the smoke set: the gate's numbers are the report's, every answer in the pools was graded by
    the checker, the handed-on model is the Phase-4 architecture (no self-model head) and still ternary."""
    from forgelib.quant import bitlinear_modules
    from forgelib.thoughts import load_quietstar

    ctx, result = curriculum
    assert result.ok and result.gate_passed
    report = json.loads((ctx.dir / "report.json").read_text())
    m = result.metrics
    assert m["tool_acc_with"] > m["tool_acc_without"] and m["tool_success_rate"] > 0
    assert m["tool_acc_with"] == round(report["tool"]["with"]["accuracy"], 4)
    for family, level in report["level_reached"].items():
        correct = report["correct_by_level"]["after"][family][str(level)]
        assert m[f"acc_reached_{family}"] == round(sum(correct) / len(correct), 4)
    answered = [h for rows in report["question_pool"].values() for row in rows for h in row["history"]]
    assert answered and all(isinstance(h["correct"], bool) for h in answered)
    assert len(report["history"]) == 8 and (ctx.dir / "state" / "state.json").is_file()
    model = load_quietstar(paths.resolve(result.models["model"]["path"]), trainable=True)
    start = load_quietstar(paths.resolve(bitnet[1].models["model"]["path"]), trainable=True)
    assert set(model.state_dict()) == set(start.state_dict()) and len(bitlinear_modules(model.base)) == 14


@pytest.mark.slow
def test_baking_hands_on_a_ternary_model_that_uses_the_calculator_unprompted(baking, curriculum):
    """Phase 6 on the smoke set: the gate's numbers are the report's; the handed-on model is still ternary (the
    adapters merged inside the quantizer) and, asked a question with no prompt, calls the calculator."""
    from forgelib.data.tasks import generate
    from forgelib.quant.bitnet import BitLinear
    from forgelib.thoughts import load_quietstar
    from forgelib.tools import generate_with_tools

    ctx, result = baking
    assert result.ok and result.gate_passed
    assert result.upstream["folder"].endswith("p/05_curriculum")
    report = json.loads((ctx.dir / "report.json").read_text())
    gate = {g.name: g.value for g in result.gate}
    for row in report["cycles"]:
        assert gate[f"gap_closed_{row['prompt']}"] == pytest.approx(row["gap_closed"], abs=1e-4)
        assert row["gap_closed"] == pytest.approx(1 - row["kl_baked"] / row["kl_unbaked"])
    assert result.metrics["acc_before"] == pytest.approx(report["input"]["none"]["accuracy"], abs=1e-4)
    assert result.metrics["tool_use_rate_after"] > result.metrics["tool_use_rate_before"]
    model = load_quietstar(paths.resolve(result.models["model"]["path"]))
    assert any(isinstance(m, BitLinear) for m in model.base.modules())
    assert not any("lora" in name for name, _ in model.base.named_modules())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(paths.resolve(result.models["model"]["path"]))
    questions = [s.prompt for s in generate("arith", 1, 16, "test", 99)]
    with model.no_thoughts():
        texts = [t.text for t in generate_with_tools(model, tok, questions, 32)]
    assert sum("<|tool|>" in t for t in texts) >= 12, texts


@pytest.mark.slow
def test_experts_hand_on_the_model_and_expert_files_that_reproduce_the_routed_answers(experts, baking):
    """Phase 7 on the smoke set: the gate's numbers are the report's, the handed-on model is the Phase-6 model (the
    experts live in small files beside it), and reloading an expert file gives the answers the report recorded."""
    from forgelib.experts import apply_svf, load_expert
    from forgelib.data.tasks import generate_levels
    from forgelib.phases.experts import correctness, make_check
    from forgelib.thoughts import load_quietstar

    ctx, result = experts
    assert result.ok and result.gate_passed
    report = json.loads((ctx.dir / "report.json").read_text())
    k = report["k"]
    assert result.metrics["n_experts"] == k and 2 <= k <= 4
    assert result.metrics["acc_routed"] == pytest.approx(
        sum(report["test"]["correct"]["routed"]) / len(report["test"]["route"]), abs=1e-4)
    handed = load_quietstar(paths.resolve(result.models["model"]["path"]))
    before = load_quietstar(paths.resolve(baking[1].models["model"]["path"]))
    ids = torch.randint(5, 200, (1, 9))
    assert torch.equal(handed.base(input_ids=ids).logits, before.base(input_ids=ids).logits)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(paths.resolve(result.models["model"]["path"]))
    svf = apply_svf(handed.base)
    params = ctx.params
    test = generate_levels(params.families, params.levels, params.test_per_level, "test", ctx.seed + 1)
    z = load_expert(paths.resolve(result.artifacts["experts"]) / "expert_0.safetensors")
    assert correctness(svf, tok, test, z, make_check(params.answer_prefixes), params) == report["test"]["correct"]["expert_0"]


@pytest.mark.slow
def test_compression_hands_on_one_artifact_whose_bits_are_its_bytes(compression, experts):
    """Phase 8 on the smoke set: the final model is one artifact file; bits per weight are its bytes; the input
    measured by Phase 8 is the model Phase 7 handed on, routed with its experts; the artifact answers."""
    from forgelib.quant.artifact import artifact_report
    from forgelib.thoughts import load_lm
    from forgelib.tools import generate_with_tools
    from transformers import AutoTokenizer

    ctx, result = compression
    assert result.ok and result.gate_passed
    m = result.metrics
    folder = paths.resolve(result.models["model"]["path"])
    on_disk = artifact_report(folder / "model.forge")
    assert m["artifact_bytes"] == on_disk["file_bytes"] and m["bits_per_weight"] == round(on_disk["bits_per_weight"], 4)
    assert m["bits_per_weight"] < 3.0 and m["compression_vs_specialists"] > 20  # measured 2.42 and 38
    assert m["acc_retention"] == pytest.approx(m["acc_final"] / m["acc_input"], abs=1e-4)
    assert paths.resolve(result.upstream["folder"]) == experts[0].dir  # the pipeline's Phase 7 was its input
    report = json.loads((ctx.dir / "report.json").read_text())
    assert report["experts"] == experts[1].metrics["n_experts"]  # the routed system, experts carried in the file
    assert m["stages_kept"] + m["stages_rolled_back"] == len(report["stages"]) == len(ctx.params.stages)
    model = load_lm(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert generate_with_tools(model.base, tok, ["3+4="], 16)[0].text  # it answers (with the calculator format)


def test_quietstar_on_a_llama_style_model(tmp_path, monkeypatch):
    """Phase 3 takes any HF causal LM with the reserved thought tokens: a tiny Llama as the upstream champion."""
    from forgelib.data.tasks import FAMILIES, build_mix, format_sample
    from forgelib.data.tokenizer import train_tokenizer
    from forgelib.results import PhaseResult
    from forgelib.thoughts import load_quietstar
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setenv("FORGE_OUTPUTS", str(tmp_path / "out"))
    texts = [format_sample(s, with_steps=True) for s in build_mix({f: 1 for f in FAMILIES}, (1, 3), 300, "train", 0)]
    tok = train_tokenizer(texts, vocab_size=300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    folder = tmp_path / "champion"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    up = PhaseResult("evomerge", 2, "llama3", status="ok")
    with ModelRegistry(paths.registry_path()) as reg:
        up.models["champion"] = {"path": str(folder), "registry_id": reg.register_model(
            session_id="llama3", phase_name="evomerge", model_name="champion", model_path=str(folder))}
    overrides = {**QUIET, "quietstar": {"steps": 3, "test_per_family": 2, "curve_every": 0, "curve_samples": 3,
                                        "heatmap_samples": 1, "acc_margin": 1.0, "nll_margin": 10.0,
                                        "pause_arm": True}}
    ctx = open_phase("quietstar", "parameters/smoke.yaml", overrides, session="llama3", upstream=up)
    result = ctx.spec.load().run(ctx.params, ctx)
    again = load_quietstar(paths.resolve(result.models["model"]["path"]))
    assert type(again.base).__name__ == "LlamaForCausalLM"
    test = json.loads((ctx.dir / "report.json").read_text())["test"]  # the pause-token ablation ran and is reported
    assert set(test) == {"base", "thoughts", "pause", "no_thoughts"}
    assert result.metrics["gain_over_pause_acc"] == round(test["thoughts"]["accuracy"] - test["pause"]["accuracy"], 4)
    assert {g.name for g in result.gate} == {"nll_no_thoughts_minus_nll_thoughts", "acc_thoughts_minus_acc_base"}


def test_evomerge_on_llama_style_models(tmp_path, monkeypatch, tiny_llama):
    """Phase 2 takes any HF causal LM: a tiny Llama trunk and three perturbed copies as the upstream."""
    import copy

    from forgelib.data.tasks import FAMILIES, build_mix, format_sample
    from forgelib.data.tokenizer import train_tokenizer
    from forgelib.results import PhaseResult
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setenv("FORGE_OUTPUTS", str(tmp_path / "out"))
    texts = [format_sample(s) for s in build_mix({f: 1 for f in FAMILIES}, (1, 1), 300, "train", 0)]
    tok = train_tokenizer(texts, vocab_size=300)
    torch.manual_seed(0)
    trunk = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    up = PhaseResult("handmade", 1, "llama", status="ok")
    with ModelRegistry(paths.registry_path()) as reg:
        for i, role in enumerate(("trunk", "a", "b", "c")):
            model = copy.deepcopy(trunk)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.02 * i * torch.randn_like(p))
            folder = tmp_path / role
            model.save_pretrained(folder)
            tok.save_pretrained(folder)
            up.models[role] = {"path": str(folder), "registry_id": reg.register_model(
                session_id="llama", phase_name="handmade", model_name=role, model_path=str(folder))}
    overrides = {**QUIET, "evomerge": {"sources": ["a", "b", "c"], "runtime": {}, "budget": 10,
                                       "fitness_per_family": 2, "test_per_family": 2, "per_layer": False}}
    ctx = open_phase("evomerge", "parameters/smoke.yaml", overrides, session="llama", upstream=up)
    result = ctx.spec.load().run(ctx.params, ctx)
    assert result.models["champion"]["registry_id"]
    rivals = ("trunk", "best_parent", "uniform")
    assert {g.name for g in result.gate} == ({f"champion_acc_minus_{x}_acc" for x in rivals}
                                             | {f"{x}_nll_minus_champion_nll_at_acc_tie" for x in rivals})


def test_evomerge_without_needed_upstream_models_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_OUTPUTS", str(tmp_path))
    up = PhaseResult("cognate", 1, "x", status="ok", models={"trunk": {"path": str(tmp_path), "registry_id": None}})
    ctx = open_phase("evomerge", "parameters/smoke.yaml", QUIET, session="x", upstream=up)
    with pytest.raises(UpstreamError, match=r"needs upstream models \['reasoning', 'memory', 'speed'\]"):
        run_phase(ctx)
    assert PhaseResult.load(ctx.dir).status == "failed"


def test_impossible_model_shape_names_the_field(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_OUTPUTS", str(tmp_path))
    ctx = open_phase("cognate", "parameters/smoke.yaml",
                     {**QUIET, "cognate": {"model": {"hidden_size": 30}, "trunk": {"steps": 1}}}, session="bad")
    with pytest.raises(CognateConfigError, match=r"hidden_size \(30\) must be divisible by num_attention_heads"):
        run_phase(ctx)


def test_unknown_family_in_mix_is_a_parameter_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_OUTPUTS", str(tmp_path))
    with pytest.raises(ParameterError, match=r"trunk\.mix: unknown or no families \['arithmetic'\]"):
        open_phase("cognate", "parameters/smoke.yaml", {"cognate": {"trunk": {"mix": {"arithmetic": 1}}}})


def test_tokenizer_without_special_tokens_is_refused(tmp_path):
    from forgelib.data.tokenizer import MissingSpecialTokensError, load_tokenizer
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw).save_pretrained(tmp_path)
    with pytest.raises(MissingSpecialTokensError, match=r"<\|startofthought\|>"):
        load_tokenizer(tmp_path)


def test_trunk_from_a_checkpoint_of_another_architecture_is_refused(tmp_path, monkeypatch, tiny_llama):
    from forgelib.train import CheckpointMismatchError

    monkeypatch.setenv("FORGE_OUTPUTS", str(tmp_path / "out"))
    tiny_llama.save_pretrained(tmp_path / "llama")
    ctx = open_phase("cognate", "parameters/smoke.yaml",
                     {**QUIET, "cognate": {"init_from": str(tmp_path / "llama")}}, session="ckpt")
    with pytest.raises(CheckpointMismatchError, match="is a 'llama' model, but the model being trained is 'cognate'"):
        run_phase(ctx)


@pytest.mark.slow
def test_orchestrator_runs_a_single_phase_with_the_source_design_names(cognate):
    from forgelib.pipeline import PipelineOrchestrator

    with PipelineOrchestrator({"params_file": "parameters/smoke.yaml", "session": "orch",
                               "overrides": QUIET}) as pipe:
        result = pipe.run_single_phase(phase_num=2, input_models=[cognate[0].dir])
    assert result.ok and result.models["champion"]["registry_id"]


def test_a_step_budget_that_phase1_would_ignore_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_OUTPUTS", str(tmp_path))
    with pytest.raises(ParameterError, match=r"train\.steps \(500\) is not used by Phase 1.*trunk\.steps"):
        open_phase("cognate", "parameters/smoke.yaml", {"cognate": {"train": {"steps": 500}}})


def _lab_checks(session, shots, work):
    """The pipeline notebook (resuming ``session``: nothing recomputes) and the scorecard notebook, run in
    JupyterLab by headless Chromium; then the scorecard's generation playground is used like a person would:
    a new question + Enter, the max-tokens slider moved with the keyboard, another model picked, Run."""
    import secrets

    from browser import JupyterLab, LabBrowser, copy_notebook, find_browser
    from forgelib.phases import PHASES

    chromium, chromedriver = find_browser()
    nbs = paths.repo_root() / "notebooks"
    copy_notebook(nbs / "00_pipeline.ipynb", work / "lab" / "00_pipeline.ipynb", session=session, resume=True)
    copy_notebook(nbs / "09_scorecard.ipynb", work / "lab" / "09_scorecard.ipynb", session=session)
    env = {"FORGE_OUTPUTS": str(paths.outputs_root()), "FORGE_ROOT": str(paths.repo_root())}
    with JupyterLab(work / "lab", work / "state", token=secrets.token_hex(16), env=env) as lab, \
            LabBrowser(lab, shots, chromium, chromedriver, work / "chromium") as browser:
        browser.open_notebook("00_pipeline.ipynb")
        browser.run_all("00_pipeline.ipynb", timeout=120)
        tables = browser.js("""return Array.from(window.jupyterapp.shell.currentWidget.node
            .querySelectorAll('.jp-OutputArea-output table'));""")
        summary = next((t for t in tables if all(spec.dirname in t.text for spec in PHASES)), None)
        assert summary is not None, \
            f"no summary table naming every phase in the pipeline notebook's outputs: {[t.text for t in tables]}"
        assert summary.text.count("skipped") == len(PHASES), f"a phase was not kept as completed:\n{summary.text}"
        browser.js("arguments[0].scrollIntoView({block: 'center'})", summary)
        browser.screenshot("00_pipeline")
        browser.save()
        lab.shutdown_kernels()

        browser.open_notebook("09_scorecard.ipynb")
        browser.run_all("09_scorecard.ipynb", timeout=120)
        return _use_playground(browser)


def _use_playground(browser):
    """The scorecard notebook's playground, used like a person would; returns its three answers."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    from browser import wait_for

    box = wait_for(lambda: browser.js("""
        const label = Array.from(window.jupyterapp.shell.currentWidget.node
            .querySelectorAll('.widget-text label')).find(l => l.textContent.trim() === 'question');
        return label ? label.closest('.widget-vbox') : null;"""), 30, "the playground (a 'question' box)")
    browser.js("arguments[0].scrollIntoView({block: 'center'})", box)
    answer = lambda: box.find_element(By.CSS_SELECTOR, ".widget-html-content").text.strip()  # noqa: E731
    first = wait_for(answer, 30, "the playground's first answer")
    browser.screenshot("09_playground_before")

    # a new question, sent with Enter (the text box updates on Enter or blur)
    question = box.find_element(By.CSS_SELECTOR, ".widget-text input")
    question.click()
    question.send_keys(Keys.CONTROL, "a")
    question.send_keys("40-13=", Keys.ENTER)
    second = wait_for(lambda: (a := answer()) != first and a, 30,
                      f"the answer to change after a new question (it still reads {first!r})")

    # the max-tokens slider, moved with the arrow keys on its handle
    slider = box.find_element(By.XPATH, ".//div[contains(@class, 'widget-slider')]"
                                        "[.//label[normalize-space()='max tokens']]")
    readout = slider.find_element(By.CSS_SELECTOR, ".widget-readout")
    start = int(readout.text)
    slider.find_element(By.CSS_SELECTOR, ".noUi-handle").click()
    for _ in range(8):
        slider.find_element(By.CSS_SELECTOR, ".noUi-handle").send_keys(Keys.ARROW_LEFT)
    wait_for(lambda: int(readout.text) < start, 10, f"the max-tokens slider to move below {start}")

    # another model of the chain (Phase 1's trunk), then Run
    pick = Select(box.find_element(By.CSS_SELECTOR, ".widget-dropdown select"))
    pick.select_by_index(0)
    marker = pick.first_selected_option.text.strip()
    box.find_element(By.XPATH, ".//button[normalize-space()='Run']").click()
    third = wait_for(lambda: (a := answer()).startswith(marker + ":") and a != second and a, 30,
                     f"the answer of {marker!r} after Run (it still reads {second!r})")
    browser.screenshot("09_playground_after")
    browser.raise_errors("09_scorecard.ipynb")
    return first, second, third


@pytest.mark.slow
def test_jupyterlab_in_a_real_browser(pipeline, outputs, tmp_path):
    """JupyterLab in headless Chromium: the pipeline notebook (resuming session "p") and the scorecard notebook
    run every cell without an error output, and the scorecard's playground answers a new question and another
    model. Screenshots: <outputs>/browser/."""
    from browser import BrowserUnavailable, find_browser

    try:
        find_browser()
    except BrowserUnavailable as exc:
        pytest.skip(f"Chromium/chromedriver not installed: {exc}; .ci/run installs them with apt-get")
    first, second, third = _lab_checks("p", paths.outputs_root() / "browser", tmp_path)
    assert first != second != third
