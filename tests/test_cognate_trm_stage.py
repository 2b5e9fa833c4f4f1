"""TRM recursion chosen per Phase-1 stage (issue 27): a stage's recursion settings reach its model and its saved
config, a ``trm`` stage with several supervision steps trains through ``forgelib.supervision`` (one optimizer step
per supervision step), a default stage trains exactly as the plain loop does, impossible settings are refused by
name, and Phase 2 scores a ``trm`` parent as ``trm``."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
from types import SimpleNamespace

import pytest
import torch

from forgelib.models import CognateConfig, CognateForCausalLM
from forgelib.models.trm import TRMCarry
from forgelib.params import ParameterError
from forgelib.phases import cognate
from forgelib.phases import evomerge as evo
from forgelib.phases import open_phase, run_phase

TRM_STAGE = {"recursion": "trm", "n_latent": 1, "n_cycles": 2, "supervision_steps": 2}
SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=96)


@pytest.fixture(scope="module")
def tok():
    from tests.helpers import task_tokenizer

    return task_tokenizer()


# --- the Stage's settings ---------------------------------------------------------------------------------


def test_stage_defaults_are_the_config_defaults():
    stage, config = cognate.Stage(), CognateConfig()
    assert stage.runtime() == {k: getattr(config, k) for k in cognate.STAGE_RUNTIME_KEYS}
    assert stage.recursion == "cycles" and set(cognate.TRM_ONLY) < set(cognate.STAGE_RUNTIME_KEYS)


@pytest.mark.parametrize("changes, match", [
    ({"recursion": "trm"}, r"recursion='trm' needs n_latent >= 1"),  # the config's own check, n_latent 0
    ({**TRM_STAGE, "supervision_steps": 0}, r"supervision_steps must be >= 1"),
    ({**TRM_STAGE, "halt_exploration_prob": 1.5}, r"halt_exploration_prob must lie in \[0, 1\]"),
    ({"supervision_steps": 2}, r"supervision_steps=2: setting\(s\) of recursion 'trm', but this stage's recursion "
                               r"is 'cycles'; set recursion: trm or leave \['supervision_steps'\] out"),
    ({"grad_last_cycle_only": False}, r"grad_last_cycle_only=False: setting\(s\) of recursion 'trm'"),
    ({"recursion": "loop"}, r"recursion must be one of \['cycles', 'trm'\], got 'loop'"),
    ({"halt_threshold": 0.0}, r"halt_threshold must lie in \(0, 1\]"),
])
def test_impossible_stage_settings_are_refused(changes, match):
    with pytest.raises(ValueError, match=match):
        cognate.Stage(mix={"arith": 1}, **changes)


def test_a_parameter_file_names_the_stage_and_the_allowed_recursions(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_OUTPUTS", str(tmp_path))
    with pytest.raises(ParameterError, match=r"cognate\.reasoning\.recursion: 'loop' is not one of "
                                             r"\['cycles', 'trm'\]"):
        open_phase("cognate", "parameters/smoke.yaml", {"cognate": {"reasoning": {"recursion": "loop"}}})
    with pytest.raises(ParameterError, match=r"cognate\.trunk: recursion='trm' needs n_latent >= 1"):
        open_phase("cognate", "parameters/smoke.yaml", {"cognate": {"trunk": {"recursion": "trm"}}})


def test_apply_stage_sets_every_runtime_setting_and_adds_no_parameter(tok):
    params = cognate.Params(tokenizer_samples=50)
    params.model = cognate.ModelShape(**{k: v for k, v in SHAPE.items() if k != "max_position_embeddings"})
    trunk = cognate.make_trunk(params, tok, 0)
    stage = cognate.Stage(mix={"arith": 1}, **TRM_STAGE, halt_exploration_prob=0.0, grad_last_cycle_only=False)
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    model = cognate.apply_stage(trunk, stage)
    assert {k: getattr(model.config, k) for k in cognate.STAGE_RUNTIME_KEYS} == stage.runtime()
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# --- training ---------------------------------------------------------------------------------------------


def _small(tok, **stage) -> tuple[cognate.Params, cognate.Stage, SimpleNamespace]:
    params = cognate.Params(tokenizer_samples=50, batch_size=4, bucket=2, max_len=48)
    params.model = cognate.ModelShape(**{k: v for k, v in SHAPE.items() if k != "max_position_embeddings"})
    params.train = dataclasses.replace(params.train, log_every=1, warmup_steps=1)
    ctx = SimpleNamespace(seed=5, dir=None, tracker=None, device="cpu", quiet=True, log=lambda *a, **k: None)
    return params, cognate.Stage(mix={"arith": 1, "algebra": 1}, steps=4, seed=1, **stage), ctx


def test_a_default_stage_trains_exactly_as_the_plain_loop(tok):
    """The reference is what train_stage did before stages had a recursion: the plain loop, the model's own loss."""
    from forgelib.optim import create_optimizer_from_phase
    from forgelib.train import train

    params, stage, ctx = _small(tok, n_cycles=2)
    trunk = cognate.make_trunk(params, tok, 0)
    model, reference = (cognate.apply_stage(copy.deepcopy(trunk), stage) for _ in range(2))
    history = cognate.train_stage(model, tok, params, stage, "reasoning", ctx, 0)
    seed = ctx.seed + stage.seed
    torch.manual_seed(seed)
    optimizer = create_optimizer_from_phase(reference, phase_num=1, **params.optimizer)
    config = dataclasses.replace(params.train, steps=stage.steps)
    train(reference, cognate.training_batches(tok, params, stage, seed), optimizer, config, quiet=True)
    got, want = model.state_dict(), reference.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert "supervision_episodes" not in history.data
    assert not any("supervision_step" in key for row in history.rows for key in row)


def test_trm_exploration_draws_from_its_own_generator_only():
    """Stages side by side in threads each seed torch's global generator: a trm stage's exploration must not read
    it. With a generator the draws are those of the generator alone and the global state is untouched."""
    x = torch.zeros(6, 3, 4)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    started = TRMCarry(4, generator=torch.Generator().manual_seed(9)).started(x, 0.5, training=True)
    assert torch.equal(torch.get_rng_state(), state)
    gen = torch.Generator().manual_seed(9)
    low = torch.randint(2, 5, (6,), generator=gen)
    want = torch.where(torch.rand(6, generator=gen) < 0.5, low, torch.zeros_like(low))
    assert torch.equal(started.min_steps, want) and started.generator is not None


# --- a tiny Phase 1 with a trm reasoning specialist ------------------------------------------------------


def _tiny_overrides(reasoning: dict) -> dict:
    stages = {s: {"steps": 6, "warmup_steps": 2} for s in ("memory", "speed")}
    # hand_on_cycles: trained -- these tests check how a stage's recursion trains, saves and reloads (8 steps
    # cannot earn a cycle, and auto would hand the model on at one; test_a_model_keeps_its_cycles_... checks that)
    return {"run": {"quiet": True, "tracking": "jsonl", "workers": 1},
            "cognate": {"tokenizer_samples": 200, "eval_per_family": 2, "min_disagreement": 0,
                        "hand_on_cycles": "trained", "min_accuracy_gain": -0.5, "expected_gain": 0.5,
                        "min_above_chance": -1,
                        "train": {"log_every": 1}, "trunk": {"steps": 8}, **stages,
                        "reasoning": {"steps": 7, "warmup_steps": 2, **reasoning}}}


def test_tiny_phase1_trains_saves_and_reloads_a_trm_specialist(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_OUTPUTS", str(tmp_path))
    trained = {}
    original = cognate.train_specialists

    def keep(*args, **kwargs):  # the in-memory specialists, to compare with what is saved
        models, histories = original(*args, **kwargs)
        trained.update(models)
        return models, histories

    monkeypatch.setattr(cognate, "train_specialists", keep)
    ctx = open_phase("cognate", "parameters/smoke.yaml", _tiny_overrides(TRM_STAGE), session="trm")
    result = run_phase(ctx)
    assert result.status == "ok"
    report = json.loads((ctx.dir / "report.json").read_text())
    settings = {**cognate.Stage().runtime(), **TRM_STAGE}
    assert report["runtime"]["reasoning"] == settings
    assert report["runtime"]["speed"]["recursion"] == "cycles" and report["runtime"]["speed"]["halt_threshold"] == 0.3
    folder = ctx.dir / "models" / "reasoning"
    saved = json.loads((folder / "config.json").read_text())
    assert {k: saved[k] for k in settings} == settings
    loaded = CognateForCausalLM.from_pretrained(folder).eval()
    assert loaded.config.recursion == "trm" and loaded.config.supervision_steps == 2
    ids = torch.randint(3, loaded.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, trained["reasoning"].eval()(ids).logits)
    # the supervision loop's contract: steps counts optimizer steps; each batch stays for consecutive supervision
    # steps 1, 2, ... (at most supervision_steps, fewer when every supervised token halted); episodes = batches
    rows = [json.loads(line) for line in (ctx.dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in rows if "reasoning/loss" in r]
    sequence = [r["reasoning/supervision_step"] for r in losses]
    assert len(losses) == 7 and sequence[0] == 1
    assert all(b == 1 or (b == a + 1 and b <= 2) for a, b in zip(sequence, sequence[1:]))
    episodes = report["histories"]["reasoning"]["supervision_episodes"]
    assert episodes == sequence.count(1) and math.ceil(7 / 2) <= episodes <= 7
    assert all("supervision_episodes" not in report["histories"][m] for m in ("trunk", "memory", "speed"))
    assert not any("trunk/supervision_step" in r or "speed/supervision_step" in r for r in rows)
    assert 1 <= report["models"]["reasoning"]["mean_cycles"] <= 2  # trm counts supervision steps


# --- Phase 2: a trm parent ------------------------------------------------------------------------------------


def _family(vocab: int = 40):
    torch.manual_seed(0)
    trunk = CognateForCausalLM(CognateConfig(vocab_size=vocab, **SHAPE, memory_modules=True)).eval()
    parents = {}
    for i, name in enumerate(("reasoning", "speed")):
        child = copy.deepcopy(trunk)
        with torch.no_grad():
            for p in child.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        parents[name] = child
    cognate.apply_stage(parents["reasoning"], cognate.Stage(mix={"arith": 1}, **TRM_STAGE))
    return trunk, parents


def test_an_unmerged_trm_parent_is_scored_as_trm():
    from forgelib.merge import merge_models

    trunk, parents = _family()
    params = evo.Params(sources=list(parents), runtime_choices=[{"n_cycles": 1}, {"n_cycles": 2}])
    keys = evo.own_keys(evo.runtime_settings(params, trunk), parents, trunk)
    assert keys == ["n_cycles", "n_latent", "recursion", "supervision_steps"]
    recipes = dict(evo.unmerged_recipes(params, parents, trunk, keys))
    rebuilt = merge_models(recipes["reasoning"], parents, trunk)
    assert rebuilt.config.recursion == "trm" and rebuilt.config.n_latent == 1
    ids = torch.randint(3, 40, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the parent itself, as it was saved
        assert torch.equal(rebuilt(ids).logits, parents["reasoning"](ids).logits)
        assert torch.equal(merge_models(recipes["trunk"], parents, trunk)(ids).logits, trunk(ids).logits)


def test_a_merge_runs_under_the_trunks_recursion_unless_the_runtime_sets_one():
    from forgelib.merge import merge_models
    from forgelib.merge.models import uniform_recipe

    trunk, parents = _family()
    params = evo.Params(sources=list(parents), runtime_choices=[{}, {**TRM_STAGE}])
    plain, trm = evo.runtime_settings(params, trunk)
    recipe = uniform_recipe(list(parents), "trunk")
    assert merge_models(dataclasses.replace(recipe, config=plain), parents, trunk).config.recursion == "cycles"
    merged = merge_models(dataclasses.replace(recipe, config=trm), parents, trunk)
    assert merged.config.recursion == "trm" and merged(torch.tensor([[3, 4, 5]])).logits.shape == (1, 3, 40)
    with pytest.raises(ValueError, match=r"runtime/runtime_choices recursion=trm over the trunk's config: "
                                         r"recursion='trm' needs n_latent >= 1"):
        evo.runtime_settings(evo.Params(sources=list(parents), runtime_choices=[{"recursion": "trm"}]), trunk)
    with pytest.raises(ValueError, match=r"runtime_choices\[0\]\.supervision_steps must be >= 1"):
        evo.Params(sources=list(parents), runtime_choices=[{"supervision_steps": 0}])


def test_cycles_frame_shows_the_curve_and_its_gains():
    """Notebook 01's view of Phase 1's ``cycles_curve``: accuracy at 1, trained and twice the trained cycles, the
    paired gains with their lower bounds; empty for a report without it."""
    from forgelib.viz.cognate import cycles_frame

    report = {"cycles_curve": {"reasoning": {
        "trained_cycles": 2, "families": ["multistep", "algebra"], "n": 256,
        "accuracy": {"1": 0.7656, "2": 0.7695, "4": 0.7656},
        "gains": {"2_minus_1": {"diff": 0.0039, "lower_bound": -0.0089, "n": 256},
                  "4_minus_2": {"diff": -0.0039, "lower_bound": -0.0195, "n": 256}}}}}
    frame = cycles_frame(report)
    row = frame.loc["reasoning (trained at 2, multistep+algebra, n=256)"]
    assert row["acc at 1 cycle"] == 0.7656 and row["acc at 4 cycles"] == 0.7656
    assert row["gain 2 vs 1 (lower bound)"] == "+0.004 (-0.009)"
    assert row["gain 4 vs 2 (lower bound)"] == "-0.004 (-0.019)"  # -0.0195 printed to 3 places
    assert "handed on at (cycles)" not in row  # a report from before the decision
    report["cycles_decision"] = {"reasoning": {"cycles": 1}}
    assert cycles_frame(report).loc["reasoning (trained at 2, multistep+algebra, n=256)", "handed on at (cycles)"] == 1
    assert cycles_frame({}).empty


@pytest.mark.parametrize("gained, lost, keeps", [
    (30, 5, True),    # the second cycle right on 30 questions the first misses, wrong on 5: +0.125, clearly above 0
    (12, 10, False),  # +0.01: not shown above 0 on 200 questions -> handed on at one cycle
    (0, 10, False),   # the second cycle loses
])
def test_a_model_keeps_its_cycles_only_when_they_beat_one_cycle(gained, lost, keeps):
    """The worked example: 200 own-family questions, the paired table of the same weights at 1 and 2 cycles (both
    right 100, gained, lost, the rest wrong); 'auto' keeps 2 cycles only when the Agresti-Min lower bound of the gain
    -- computed here by hand -- is above cycles_min_gain (0); 'trained' / 'one' force it and still report it."""
    from forgelib.suite import GuardParams

    one = [1] * 100 + [0] * gained + [1] * lost + [0] * (100 - gained - lost)
    two = [1] * 100 + [1] * gained + [0] * lost + [0] * (100 - gained - lost)
    curve = {"reasoning": {"trained_cycles": 2, "families": ["multistep", "algebra"], "n": 200,
                           "correct": {"1": one, "2": two, "4": two}}}
    guard = GuardParams()
    n = 202.0
    pg, pl = (gained + 0.5) / n, (lost + 0.5) / n
    lower = (pg - pl) - 1.6448536 * math.sqrt((pg + pl - (pg - pl) ** 2) / n)
    chosen = cognate.cycles_decision(curve, cognate.Params(), guard)["reasoning"]
    assert chosen["verdict"]["lower"] == pytest.approx(lower, abs=1e-4)
    assert chosen["cycles"] == (2 if keeps else 1) and keeps is (lower > 0) and chosen["trained_cycles"] == 2
    assert chosen["reason"].startswith(f"at 2 cycles {(100 + gained) / 200:.3f}, at 1 cycle {(100 + lost) / 200:.3f} "
                                       f"on the same 200 test questions of multistep+algebra: gain "
                                       f"{(gained - lost) / 200:+.3f}")
    assert "hand_on_cycles: auto" in chosen["rule"]
    for forced, cycles in (("trained", 2), ("one", 1)):
        again = cognate.cycles_decision(curve, cognate.Params(hand_on_cycles=forced), guard)["reasoning"]
        assert again["cycles"] == cycles and again["verdict"] == chosen["verdict"] and forced in again["rule"]
    higher = cognate.cycles_decision(curve, cognate.Params(cycles_min_gain=0.2), guard)["reasoning"]
    assert higher["cycles"] == 1  # a gain of at most +0.125 never clears 0.2
    with pytest.raises(ValueError, match="hand_on_cycles must be one of"):
        cognate.Params(hand_on_cycles="twice")
    with pytest.raises(ValueError, match="cycles_min_gain must lie in"):
        cognate.Params(cycles_min_gain=-0.1)


def test_a_specialist_trains_and_is_compared_at_its_own_levels(tmp_path, monkeypatch):
    """``Stage.levels``: the speed specialist at level 3 only (the phase at 1-2) draws its training stream there, and
    its comparison with the trunk asks level-3 questions of its own families; the others keep the phase's levels."""
    monkeypatch.setenv("FORGE_OUTPUTS", str(tmp_path))
    drawn = []
    original = cognate.TaskStream

    def spy(mix, levels, *args, **kwargs):
        drawn.append((tuple(sorted(mix)), tuple(levels)))
        return original(mix, levels, *args, **kwargs)

    monkeypatch.setattr(cognate, "TaskStream", spy)
    overrides = _tiny_overrides({})
    overrides["cognate"]["speed"]["levels"] = [3, 3]
    ctx = open_phase("cognate", "parameters/smoke.yaml", overrides, session="lv")
    params = ctx.params
    assert cognate.stage_levels(params, params.specialists["speed"]) == (3, 3)
    assert cognate.stage_levels(params, params.trunk) == tuple(params.levels) == (1, 2)
    result = run_phase(ctx)
    assert result.status == "ok"
    speed_mix = tuple(sorted(cognate.stage_mix(params, params.specialists["speed"])))
    assert (speed_mix, (3, 3)) in drawn and sum(levels == (3, 3) for _, levels in drawn) == 1
    report = json.loads((ctx.dir / "report.json").read_text())
    rows = report["specialists_vs_trunk"]
    assert rows["speed"]["levels"] == [3, 3] and rows["reasoning"]["levels"] == rows["memory"]["levels"] == [1, 2]
    with pytest.raises(ParameterError, match=r"speed: levels must be \(lowest, highest\)"):
        open_phase("cognate", "parameters/smoke.yaml", {"cognate": {"speed": {"levels": [3, 2]}}})


def test_a_lora_stage_trains_an_adapter_and_hands_on_the_merged_model(tok):
    """``lora_r`` >= 1: the adapter (rank r on every projection), the memory and the halting head train; the
    embeddings, norms and head stay as the trunk had them; the stage ends with a plain Cognate model whose weights
    moved by at most rank r per projection and whose logits are those of the adapter before it was merged."""
    from forgelib.optim import create_optimizer_from_phase
    from forgelib.train import train

    params, stage, ctx = _small(tok, lora_r=2, use_memory=True)
    trunk = cognate.make_trunk(params, tok, 0)
    model, reference = (cognate.apply_stage(copy.deepcopy(trunk), stage) for _ in range(2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cognate.train_stage(model, tok, params, stage, "memory", ctx, 0)
    assert type(model) is CognateForCausalLM and all(p.requires_grad for p in model.parameters())
    assert not any("lora" in name for name, _ in model.named_parameters())
    after = model.state_dict()
    projections = [k for k in after if k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight",
                                                   "o_proj.weight", "gate_proj.weight", "up_proj.weight",
                                                   "down_proj.weight"))]
    assert len(projections) == 7
    for key in projections:
        delta = (after[key] - before[key]).double()
        assert delta.abs().max() > 0, key
        assert torch.linalg.matrix_rank(delta, atol=1e-6).item() <= 2, key
    for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                "model.layers.0.input_layernorm.weight"):
        assert torch.equal(after[key], before[key]), key
    assert not torch.equal(after["model.layers.0.self_attn.memory.out_gate.weight"],
                           before["model.layers.0.self_attn.memory.out_gate.weight"])
    # the same training by hand through peft: its logits before the merge are the handed-on model's
    seed = ctx.seed + stage.seed
    torch.manual_seed(seed)
    wrapped = cognate.with_stage_lora(reference, stage)
    assert {n for n, p in wrapped.named_parameters() if p.requires_grad and "lora_" not in n} == {
        n.replace("model.", "base_model.model.model.", 1) for n in before
        if "memory." in n or "halt_head." in n}
    optimizer = create_optimizer_from_phase(wrapped, phase_num=1, **params.optimizer)
    train(wrapped, cognate.training_batches(tok, params, stage, seed),
          optimizer, dataclasses.replace(params.train, steps=stage.steps), quiet=True)
    ids = torch.tensor([tok("12+7=19")["input_ids"]])
    with torch.no_grad():
        wrapped.eval(), model.eval()
        torch.testing.assert_close(model(input_ids=ids).logits, wrapped(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_a_lora_rank_below_zero_is_refused():
    with pytest.raises(ValueError, match="lora_r"):
        cognate.Stage(mix={"arith": 1}, lora_r=-1)


def test_the_scorecard_says_whether_the_chain_recurses_and_why(tmp_path):
    """``forgelib.scorecard.recursion_note`` states Phase 1's cycles decision as its report holds it (handed on at
    one cycle by the measurement, or kept at the trained count), the cycles Phase 2's champion runs, a Phase 1 from
    before the decision, and nothing for a chain without a model trained with recursion or without Phase 1."""
    from forgelib.results import PhaseResult
    from forgelib.scorecard import recursion_note
    from forgelib.suite import GuardParams

    folders = {n: tmp_path / name for n, name in ((1, "01_cognate"), (2, "02_evomerge"))}
    for number, folder in folders.items():
        folder.mkdir()
        result = PhaseResult(folder.name[3:], number, "s", status="ok")
        result.artifacts["report"] = str(folder / "report.json")
        result.save(folder)
    entries = [{"number": n, "path": f / "models" / "m"} for n, f in folders.items()]
    (folders[2] / "report.json").write_text(json.dumps({"runtime": {"champion_runtime": {"n_cycles": 1}}}))
    one, two = [1] * 100 + [0] * 100, [1] * 100 + [1] * 30 + [0] * 70
    curve = {"reasoning": {"trained_cycles": 2, "families": ["multistep"], "n": 200,
                           "correct": {"1": one, "2": one, "4": one}}}

    def note(curve, **params):
        decision = cognate.cycles_decision(curve, cognate.Params(**params), GuardParams())
        (folders[1] / "report.json").write_text(json.dumps({"cycles_curve": curve, "cycles_decision": decision}))
        return recursion_note(entries)

    plain = note(curve)
    assert plain.startswith("recursion: Phase 1 handed reasoning on at 1 cycle, trained at 2 (at 2 cycles 0.500, at 1 "
                            "cycle 0.500 on the same 200 test questions of multistep: gain +0.000")
    assert "hand_on_cycles: auto" in plain and "Phase 2's champion runs 1 cycle;" in plain
    curve["reasoning"]["correct"]["2"] = two
    assert note(curve).startswith("recursion: Phase 1 handed reasoning on at 2 cycles, trained at 2 (at 2 cycles 0.650")
    assert "hand_on_cycles: one (set)" in note(curve, hand_on_cycles="one")
    (folders[1] / "report.json").write_text(json.dumps({"cycles_curve": curve}))
    assert "predates its cycles decision" in recursion_note(entries)
    assert note({}) == "" and recursion_note(entries[1:]) == ""
