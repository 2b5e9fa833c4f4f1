"""Help a new user can read, and the source design's public names.

- every ``forge`` subcommand's and every ``forge bench NAME``'s parser: each option described, no Markdown in any
  description or help; ``forge bench --help`` says what each benchmark measures, ``forge bench NAME --help`` is
  plain text and answered without importing the benchmark; ``forge registry list`` rounds sizes;
- ``WandBIntegration`` (the design's W&B entry point) over ``forgelib.tracking``: a disabled run writes the logged
  metrics to metrics.jsonl, an offline one a real W&B run;
- ``PromptManager.get_phase3_prompts()``: the prompts the baking phase bakes, read as the phase reads them.
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

import pytest

import forgelib
from forgelib import cli
from forgelib.bench import options
from forgelib.helptext import has_markdown, plain_text

BENCH_DIR = Path(options.__file__).parent


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _problems(parser: argparse.ArgumentParser, where: str) -> list[str]:
    """Options without a help string, and Markdown left in the description, epilog or any help."""
    found = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = "/".join(action.option_strings) or action.dest
        if not (action.help or "").strip():
            found.append(f"{where} {name}: no help")
        if has_markdown(action.help):
            found.append(f"{where} {name}: Markdown {has_markdown(action.help)} in its help")
    for part in ("description", "epilog"):
        if has_markdown(getattr(parser, part)):
            found.append(f"{where}: Markdown {has_markdown(getattr(parser, part))} in its {part}")
    if has_markdown(parser.format_help()):
        found.append(f"{where}: Markdown in --help")
    return found


# --- help texts ---------------------------------------------------------------------------------------------


def test_every_forge_subcommand_describes_every_option_in_plain_text():
    parser = cli.build_parser()
    commands = _subcommands(parser)
    assert set(commands) >= {"run", "phase", "registry", "clean", "merge", "bench"}
    problems = _problems(parser, "forge")
    for name, sub in commands.items():
        assert sub.description, f"forge {name} --help has no description"
        problems += _problems(sub, f"forge {name}")
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for choice in subparsers._choices_actions:  # the one-line summaries of `forge --help`
        if not choice.help or has_markdown(choice.help):
            problems.append(f"forge --help: the summary of {choice.dest!r} is {choice.help!r}")
    assert problems == []


@pytest.mark.parametrize("name", sorted(cli.BENCHMARKS))
def test_every_benchmark_describes_every_option_in_plain_text(name):
    parser = options.build_parser(name)
    assert parser.prog == f"forge bench {name}"
    assert parser.description and len(parser.description) > 40
    assert _problems(parser, f"forge bench {name}") == []
    text = parser.format_help()
    for option in ("--threads", "--out"):
        line = next(line for line in text.splitlines() if line.strip().startswith(option))
        assert len(line.split(maxsplit=2)) == 3, f"{option} of forge bench {name} is not described: {line!r}"


def test_the_benchmark_lists_agree():
    """One name set in the CLI's registry, the options and the summaries; each module the one the CLI runs."""
    assert set(options.ADD_OPTIONS) == set(cli.BENCHMARKS) == set(options.SUMMARIES)
    assert {n: options.module_name(n) for n in cli.BENCHMARKS} == cli.BENCHMARKS
    assert all("\n" not in s and 20 < len(s) < 200 for s in options.SUMMARIES.values())


def test_every_benchmark_parses_with_the_parser_the_help_shows():
    """No benchmark module builds a parser of its own: every option lives in forgelib.bench.options, so the
    help checks above cover them all."""
    for name, module in cli.BENCHMARKS.items():
        path = BENCH_DIR / f"{module.rsplit('.', 1)[1]}.py"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
        own = [n.func.attr for n in calls if isinstance(n.func, ast.Attribute)
               and n.func.attr in ("add_argument", "ArgumentParser")]
        assert own == [], f"{path.name} builds its own parser"
        built = [n.args[0].value for n in calls if isinstance(n.func, ast.Name) and n.func.id == "build_parser"]
        assert built == [name], f"{path.name} should parse with build_parser({name!r})"


def test_forge_bench_help_says_what_each_benchmark_measures(capsys):
    assert cli.main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for name, summary in options.SUMMARIES.items():
        line = next((line for line in lines if line.split()[:1] == [name]), None)
        assert line is not None, f"{name} is not listed"
        assert summary.split()[0] in line, f"{name}'s line does not say what it measures: {line!r}"
    assert not has_markdown(out)
    assert cli.main(["bench"]) == 2  # no name: the same list, and a usage error
    assert "compression" in capsys.readouterr().out


def test_forge_bench_name_help_is_plain_text_without_importing_the_benchmark(capsys, monkeypatch):
    monkeypatch.delitem(sys.modules, "forgelib.bench.compression", raising=False)
    with pytest.raises(SystemExit) as stop:
        cli.main(["bench", "compression", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "SeedLM against block floating point at matched bits" in out  # was **bold** in the raw docstring
    assert "--threads THREADS" in out and "torch threads" in out and "(default: 1)" in out
    assert not has_markdown(out)
    assert "forgelib.bench.compression" not in sys.modules, "the help imported the benchmark (torch, codecs)"


def test_plain_text_removes_marks_and_keeps_examples():
    doc = """`forge bench x`: **bold over
    two lines** and ``code``, *emphasis*, 30*n^2*m flops.

    # A heading

    * a bullet that is long enough to be wrapped onto a second line when the width is small
    - ``kl``: an arm

        forge bench x --seeds 3     # an example, kept as it is
    """
    text = plain_text(doc, columns=60)
    assert has_markdown(text) == []
    assert "forge bench x: bold over two lines and code, emphasis, 30*n^2*m flops." in " ".join(text.split())
    assert "\nA heading\n" in text
    bullet = text.split("- a bullet")[1].splitlines()
    assert bullet[1].startswith("  ") and all(len(line) <= 60 for line in text.splitlines()[:6])
    assert "- kl: an arm" in text
    assert "    forge bench x --seeds 3     # an example, kept as it is" in text


def test_registry_list_prints_sizes_to_three_significant_digits(tmp_path, monkeypatch, capsys):
    from forgelib.registry import ModelRegistry

    monkeypatch.setenv("FORGE_OUTPUTS", str(tmp_path / "outputs"))
    sizes = {"small": 12_345, "large": 130_000_000 // 1000}  # 0.01177... MiB and 0.1239... MiB
    with ModelRegistry(tmp_path / "outputs" / "registry.db") as reg:
        for name, size in sizes.items():
            (tmp_path / name).write_bytes(b"\0" * size)
            reg.register_model(session_id="s1", phase_name="x", model_name=name, model_path=tmp_path / name)
    assert cli.main(["registry", "list"]) == 0
    header, *rows = capsys.readouterr().out.strip().splitlines()
    column = header.split("\t").index("size_mb")
    cells = {row.split("\t")[3]: row.split("\t")[column] for row in rows}
    assert cells == {"small": "0.0118", "large": "0.124"}
    assert cli.main(["registry", "list", "--json"]) == 0  # JSON keeps the stored value
    stored = {m["model_name"]: m["size_mb"] for m in json.loads(capsys.readouterr().out)}
    assert stored["small"] == 12_345 / 2**20


def test_size_cells_never_carry_long_decimals():
    for value, shown in [(0, "0"), (0.000009536743164062, "0.00001"), (0.12345678901234567, "0.123"),
                         (1.23456789, "1.23"), (12.3456789, "12.3"), (123.456, "123"), (45678.9, "45679")]:
        assert cli._cell("size_mb", value) == shown
    assert cli._cell("model_name", 0.12345678901234567) == "0.12345678901234566"  # only sizes are rounded


# --- WandBIntegration -----------------------------------------------------------------------------------------


SEED_METRICS = dict(model_id=1, loss=2.5, perplexity=12.3, act_steps=8.2, gate_entropy=0.73, muon_lr=1e-3,
                    grokfast_mu_norm=0.15, step=1000)


def test_wandb_integration_disabled_writes_the_logged_metrics(tmp_path, monkeypatch):
    """The design README's example, W&B disabled (as in every test): the JSONL tracker file holds the metrics."""
    from forgelib.tracking import WandBIntegration, read_jsonl

    monkeypatch.setenv("FORGE_OUTPUTS", str(tmp_path / "outputs"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert forgelib.WandBIntegration is WandBIntegration
    integration = WandBIntegration(project_name="agent-forge-v2", mode="offline")
    run = integration.init_phase_run("phase1", config={"num_models": 3}, session_id="session_20251016_140000")
    integration.log_phase1_metrics(**SEED_METRICS)
    integration.log_phase1_metrics(step=1001, loss=2.4)
    run_dir = integration.run_dir
    integration.finish()
    assert run_dir == tmp_path / "outputs" / "tracking" / "session_20251016_140000" / "01_cognate"
    assert run is not None and not list(run_dir.rglob("offline-run-*"))
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1000, 1001]
    assert {k: v for k, v in rows[0].items() if k.startswith("phase1/")} == {
        f"phase1/model1/{k}": v for k, v in SEED_METRICS.items() if k not in ("model_id", "step")}
    assert rows[1]["phase1/loss"] == 2.4
    integration.init_phase_run(6, directory=tmp_path / "baking-run")  # a folder of one's own, a phase by number
    integration.log_phase6_metrics(step=3, gap_closed=0.9)
    integration.finish()
    assert read_jsonl(tmp_path / "baking-run" / "metrics.jsonl")[0]["phase6/gap_closed"] == 0.9


def test_wandb_integration_offline_writes_a_real_wandb_run(tmp_path, monkeypatch):
    from forgelib.tracking import WandBIntegration

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    integration = WandBIntegration(project_name="agent-forge-v2", mode="offline", directory=tmp_path / "runs")
    integration.init_phase_run("phase3", config={"steps": 10}, session_id="s1")
    integration.log_phase3_metrics(step=1, reward=0.5, thought_length=4)
    integration.finish()
    runs = list((tmp_path / "runs" / "s1" / "03_quietstar").rglob("offline-run-*"))
    assert runs and list(runs[0].glob("*.wandb")), "a W&B offline run with its data file"
    row = json.loads((tmp_path / "runs" / "s1" / "03_quietstar" / "metrics.jsonl").read_text())
    assert row["phase3/reward"] == 0.5 and row["step"] == 1


def test_wandb_integration_refusals_name_the_problem(tmp_path, monkeypatch):
    from forgelib.tracking import WandBIntegration

    monkeypatch.setenv("FORGE_OUTPUTS", str(tmp_path / "outputs"))
    with pytest.raises(ValueError, match=r"mode must be one of \['offline', 'online', 'disabled'\], got 'offlin'"):
        WandBIntegration(mode="offlin")
    integration = WandBIntegration(mode="disabled")
    with pytest.raises(RuntimeError, match=r"call init_phase_run\('phase1', config\) before log_phase1_metrics"):
        integration.log_phase1_metrics(loss=1.0)
    with pytest.raises(ValueError, match="unknown phase 'phase9'; give phase1 to phase8") as bad:
        integration.init_phase_run("phase9")
    assert "cognate" in str(bad.value)
    with pytest.raises(ValueError) as huge:
        integration.init_phase_run("x" * 100_000)
    assert len(str(huge.value)) < 300
    with pytest.raises(ValueError, match="session_id '../x' is not a safe folder name"):
        integration.init_phase_run("phase1", session_id="../x")
    assert not (tmp_path / "x").exists()
    integration.init_phase_run("phase2")
    with pytest.raises(ValueError, match=r"the open run is Phase 2 \(evomerge\); log_phase1_metrics needs"):
        integration.log_phase1_metrics(loss=1.0)
    with pytest.raises(ValueError, match="log_phase2_metrics: best_fitness must be a number") as text:
        integration.log_phase2_metrics(best_fitness="y" * 100_000)
    assert len(str(text.value)) < 300
    integration.finish()


# --- PromptManager ----------------------------------------------------------------------------------------------


def test_get_phase3_prompts_are_the_prompts_the_baking_phase_bakes(tmp_path):
    from forgelib.baking import BakePrompt
    from forgelib.baking.prompts import PromptManager
    from forgelib.params import load_yaml_file
    from forgelib.phases import PHASES, get_spec
    from forgelib.phases.base import load_phase_params

    assert forgelib.PromptManager is PromptManager
    smoke = load_yaml_file(Path(cli.__file__).parents[1] / "parameters" / "smoke.yaml")
    assert PromptManager.get_phase3_prompts() == [p["text"] for p in smoke["baking"]["prompts"]]
    crafted = tmp_path / "p.yaml"
    crafted.write_text("baking:\n  prompts:\n"
                       "    - {name: calc, kind: tool, text: 'compute with the tool: '}\n"
                       "    - {name: terse, kind: persona, text: 'be terse: ', answer_prefix: 'A: '}\n")
    phase_library = load_phase_params(get_spec("baking"), crafted, None, PHASES)[1].library  # what run_cycles bakes
    assert PromptManager.get_phase3_prompts(crafted) == [p.text for p in phase_library] \
        == ["compute with the tool: ", "be terse: "]
    assert PromptManager.get_phase6_prompts(crafted) == PromptManager.get_phase3_prompts(crafted)
    assert PromptManager.library(crafted) == phase_library
    assert all(isinstance(p, BakePrompt) for p in phase_library)
    overridden = [{"name": "only", "kind": "tool", "text": "tool please: "}]
    assert PromptManager.get_phase3_prompts(crafted, {"baking.prompts": overridden}) == ["tool please: "]


def test_forgelib_top_level_names():
    assert {"WandBIntegration", "PromptManager"} <= set(dir(forgelib))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        forgelib.Nope  # noqa: B018
