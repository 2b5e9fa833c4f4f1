"""Help a new user can read.

- every ``forge`` subcommand's and every ``forge bench NAME``'s parser: each option described, no Markdown in any
  description or help; ``forge bench --help`` says what each benchmark measures, ``forge bench NAME --help`` is
  plain text and answered without importing the benchmark; ``forge registry list`` rounds sizes.
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

import pytest

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
