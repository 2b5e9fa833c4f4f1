"""`forge`: run the pipeline or some phases, resume a session, list the registry, clean up, benchmark, ask a model."""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
from typing import Any, Callable


from .params import ParameterError, cut, load_yaml

BENCHMARKS = {
    "grokking": "forgelib.bench.grokking",
    "optim-lm": "forgelib.bench.optim_lm",
    "cognate": "forgelib.bench.cognate",
    "evomerge": "forgelib.bench.evomerge",
    "finetune": "forgelib.bench.finetune",
    "learn": "forgelib.bench.learn",
    "recursion": "forgelib.bench.recursion",
    "quietstar": "forgelib.bench.quietstar",
    "bitnet": "forgelib.bench.bitnet",
    "curriculum": "forgelib.bench.curriculum",
    "baking": "forgelib.bench.baking",
    "experts": "forgelib.bench.experts",
    "compression": "forgelib.bench.compression",
    "chain": "forgelib.bench.chain",
    "realquant": "forgelib.bench.realquant",
}


def _parse_set(items: list[str]) -> dict:
    """``--set cognate.trunk.steps=20`` → ``{"cognate.trunk.steps": 20}`` (values parsed as YAML, bounded); a
    malformed item or value is a ParameterError (``forge: ...``, exit status 2)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ParameterError(f"--set expects KEY=VALUE, got {cut(repr(item), 80)}")
        key, value = item.split("=", 1)
        out[key.strip()] = load_yaml(value, f"--set {key.strip()[:80]}")  # YamlError is a ParameterError
    return out


def _session_arg(value: str) -> str:
    """argparse type of ``--session``/``--resume``: a safe folder name under outputs/ (the rule is in the error)."""
    from .session import InvalidSessionNameError, check_session_name

    try:
        return check_session_name(value)
    except InvalidSessionNameError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _from_arg(value: str) -> str:
    """argparse type of ``--from``: ``SESSION:PHASE``, the session a safe name, PHASE a number or a name."""
    from .pipeline import RefusedError, parse_from
    from .session import InvalidSessionNameError

    try:
        parse_from(value)
    except (RefusedError, InvalidSessionNameError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
CONFIG_MAX_BYTES = 16 << 20  # a model's config.json is kilobytes


def _model_folder_problem(folder) -> str | None:
    """Why ``folder`` is not a saved model folder (config.json naming a model_type, and a weights file), or None.
    Reads only config.json (at most CONFIG_MAX_BYTES), so a refusal costs no model library import."""
    if not folder.is_dir():
        return f"{'not a folder' if folder.exists() else 'no such folder'}; give a saved model folder (config.json " \
               "and its weights)"
    config = folder / "config.json"
    if not config.is_file():
        return "has no config.json: not a saved model folder"
    if config.stat().st_size > CONFIG_MAX_BYTES:
        return f"config.json is {config.stat().st_size} bytes, more than a model configuration's {CONFIG_MAX_BYTES}"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        return f"config.json cannot be read: {type(exc).__name__}"
    except json.JSONDecodeError as exc:
        return f"config.json is not valid JSON (line {exc.lineno})"
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        return "not a saved model folder: its config.json names no model_type"
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        return f"not a saved model folder: no weights file ({', '.join(WEIGHT_FILES)})"
    return None


def _model_folder_arg(value: str) -> str:
    """argparse type of ``forge merge --compare``: a saved model folder, checked before anything is merged or
    written (:func:`_model_folder_problem`)."""
    from .params import cut
    from .paths import resolve

    problem = _model_folder_problem(resolve(value))
    if problem:
        raise argparse.ArgumentTypeError(f"{cut(value, 200)}: {problem}")
    return value


class _StoreGiven(argparse.Action):
    """Store the value and note that it was given (``<dest>_given``): ``--params`` has a default, yet
    ``--resume`` must tell a parameter file given from the default."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_given", True)


def _at_least_zero(kind: type) -> Callable[[str], Any]:
    """argparse type: a finite number of ``kind`` that is >= 0 (the error names the value)."""
    def parse(value: str) -> Any:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value[:80]!r}") from None
        if not math.isfinite(number):
            raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value[:80]}")
        if not number >= 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {value[:80]}")
        return number
    return parse


def _at_least_one(value: str) -> int:
    """argparse type: a whole number >= 1 (the error names the value)."""
    number = _at_least_zero(int)(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value[:80]}")
    return number


def cmd_run(args: argparse.Namespace) -> int:
    from .phases import PhaseError
    from .pipeline import PipelineError, RefusedError, run_pipeline, summary_table
    from .session import SessionInUseError

    # --resume and --from start from a session's stored parameters: --params counts only when given (not its
    # default). A resume refuses --params/--set that change a value (exit 2, naming --from); --from applies them.
    plain = args.resume is None and args.rerun_from is None
    params = args.params if plain or getattr(args, "params_given", False) else None
    try:
        overrides = {**_parse_set(args.set), **({"run.gates": args.gates} if args.gates else {})}
        outcomes = run_pipeline(params, args.phases, args.resume or args.session, overrides,
                                resume=args.resume is not None, notebooks=not args.no_notebooks,
                                rerun_from=args.rerun_from)
    except (RefusedError, ParameterError) as exc:  # refused before anything was created
        print(f"forge: {exc}", file=sys.stderr)
        return 2
    except (PipelineError, PhaseError, SessionInUseError, ValueError, KeyError) as exc:
        print(f"forge: {exc}", file=sys.stderr)
        return 1
    print(summary_table(outcomes).to_string())
    return 0


def cmd_phase(args: argparse.Namespace) -> int:
    """One phase in this process (no notebook): what ``accelerate launch`` runs on several processes."""
    from .distributed import is_follower, process_count
    from .phases import PhaseError, open_phase, run_phase
    from .session import SessionInUseError

    if process_count() > 1 and not args.session:
        print("forge: several processes (accelerate launch) need --session: each would otherwise name its own",
              file=sys.stderr)
        return 2
    try:
        try:
            ctx = open_phase(args.name, args.params, _parse_set(args.set), args.session, args.upstream)
        except ParameterError as exc:  # open_phase checks every parameter before it creates anything
            print(f"forge: {exc}", file=sys.stderr)
            return 2
        result = run_phase(ctx)
    except (PhaseError, SessionInUseError, ValueError, KeyError) as exc:
        print(f"forge: {exc}", file=sys.stderr)
        return 1
    if not is_follower():
        print(json.dumps({"session": result.session, "phase": result.phase, "status": result.status,
                          "seconds": result.duration_s, "metrics": result.metrics}, indent=1, default=str))
    return 0


def cmd_open(args: argparse.Namespace) -> int:
    """Write explore copies of a finished session's phase notebooks and say how to open them (nothing runs)."""
    from .explore import lab_instructions, write_explore_notebooks
    from .phases import PhaseError, UnknownPhaseError

    try:
        notebooks = write_explore_notebooks(args.session, args.phase)
    except (PhaseError, UnknownPhaseError) as exc:
        print(f"forge: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lab_instructions(notebooks, args.port)))
    return 0


def cmd_registry(args: argparse.Namespace) -> int:
    from . import paths
    from .registry import ModelRegistry, model_status_text

    with ModelRegistry(paths.registry_path()) as reg:
        if args.what == "sessions":
            rows = reg.list_sessions()
            keys = ["id", "status", "current_phase", "progress", "created_at"]
        else:
            rows = reg.list_models(session_id=args.session)
            keys = ["id", "session_id", "phase_name", "model_name", "status", "size_mb", "parameter_count",
                    "model_path"]
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    print("\t".join(keys))
    for row in rows:  # a model's status in words: active, gate-failed, retired: <reason>
        print("\t".join(_cell(k, model_status_text(row) if k == "status" and args.what == "list"
                               else row.get(k, "")) for k in keys))
    return 0


def _cell(key: str, value: Any) -> str:
    """A registry table cell: sizes in MB to three significant digits (whole MB from 100 on), the rest as stored."""
    if key == "size_mb" and isinstance(value, (int, float)) and not isinstance(value, bool):
        if value >= 100:
            return f"{value:.0f}"
        return f"{value:.3g}" if value >= 0.001 or value == 0 else f"{value:.6f}".rstrip("0")  # no 1e-05
    return str(value)


def cmd_clean(args: argparse.Namespace) -> int:
    from . import paths
    from .registry import ModelRegistry
    from .session import clean_sessions

    if args.keep is None and args.max_age_days is None:
        print("forge clean: give --keep N and/or --max-age-days D", file=sys.stderr)
        return 2
    with ModelRegistry(paths.registry_path()) as reg:
        removed = clean_sessions(reg, keep_sessions=args.keep, max_age_days=args.max_age_days,
                                 dry_run=args.dry_run)
    for item in removed["skipped_sessions"]:
        print(f"forge clean: skipped session {item['session']!r}: {item['reason']}", file=sys.stderr)
    print(json.dumps(removed, indent=2, default=str))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Rebuild a merged model from a recipe YAML (bit-exact: randomised methods are seeded by the recipe) or merge
    what a mergekit configuration (a YAML with ``merge_method``) describes; ``--to-mergekit`` writes the recipe
    as a mergekit configuration instead. A refused input or output is ``forge: ...`` and exit status 2, checked
    before any source is hashed or loaded."""
    from . import paths
    from .merge import MergeError
    from .merge.mergekit_yaml import merge_from_mergekit, read_mergekit_file, source_names
    from .merge.models import load_recipe, rebuild_from_recipe, verify_sources
    from .merge.targets import MergeSaveError, check_out_folder, check_weights_written
    from .modelio import load_causal_lm
    from .params import cut

    recipe = paths.resolve(args.recipe)
    mergekit = read_mergekit_file(recipe)
    try:
        if args.to_mergekit:
            return _merge_to_mergekit(args, recipe, mergekit)
        ours = None if mergekit else load_recipe(recipe)
        names = source_names(mergekit) if mergekit else [n for n in [ours.base, *ours.models] if n]
        out = check_out_folder(paths.resolve(args.out) if args.out else recipe.parent / "rebuilt", args.force,
                               [paths.resolve(n) for n in names], "--out" if args.out else "the default output "
                               "folder (rebuilt/ next to the recipe)")
        if mergekit:
            model, _ = merge_from_mergekit(mergekit, _load_source)
            if mergekit.get("tokenizer_source"):
                print(f"forge merge: note: no tokenizer is written; take it from {mergekit['tokenizer_source']!r}",
                      file=sys.stderr)
        else:
            unchecked = verify_sources(ours, paths.resolve)
            if unchecked:
                print(f"forge merge: warning: the recipe holds no checksum for {unchecked}; they are not verified",
                      file=sys.stderr)
            model = rebuild_from_recipe(recipe, _load_source)
        model.save_pretrained(out, safe_serialization=True)
        check_weights_written(out)
    except MergeSaveError as exc:
        print(f"forge: {exc}", file=sys.stderr)
        return 1
    except MergeError as exc:
        print(f"forge: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"forge: {exc}", file=sys.stderr)
        return 1
    print(f"{'merged' if mergekit else 'rebuilt'} model written to {out}")
    if args.compare:
        try:
            reference = load_causal_lm(paths.resolve(args.compare)).state_dict()
        except (OSError, ValueError, KeyError) as exc:  # checked as a folder up front; its weights may still be bad
            print(f"forge merge: --compare {args.compare}: cannot load: {type(exc).__name__}: {cut(str(exc))}",
                  file=sys.stderr)
            return 1
        state = model.state_dict()
        same = state.keys() == reference.keys() and all(state[k].equal(reference[k]) for k in state)
        print(f"bit-identical to {args.compare}: {same}")
        return 0 if same else 1
    return 0


def _merge_to_mergekit(args: argparse.Namespace, recipe, mergekit: dict | None) -> int:
    """``forge merge RECIPE --to-mergekit OUT.yaml``: the recipe written as a mergekit configuration (an existing
    file only with --force; never the recipe itself, never under the outputs root)."""
    from . import paths
    from .merge import MergeError
    from .merge.mergekit_yaml import count_layers, save_mergekit
    from .merge.models import load_recipe
    from .merge.targets import check_new_file

    if mergekit:
        raise MergeError(f"{recipe} is already a mergekit configuration")
    ours = load_recipe(recipe)
    target = check_new_file(paths.resolve(args.to_mergekit), args.force, keep=[recipe])
    layers = count_layers(paths.resolve(ours.base)) if ours.base else None
    notes = save_mergekit(ours, target, num_layers=layers)
    for note in notes:
        print(f"forge merge: not expressible in mergekit: {note}", file=sys.stderr)
    print(f"mergekit configuration written to {target}")
    return 0


def _load_source(name: str):
    """Load a merge source model folder; whatever a bad folder raises (a missing or broken config.json, truncated
    safetensors, a pickle the safe loader refuses) is a MergeError ``cannot load merge source PATH: ...``."""
    from . import paths
    from .merge import MergeError
    from .modelio import load_causal_lm
    from .params import cut

    folder = paths.resolve(name)
    try:
        return load_causal_lm(folder)
    except Exception as exc:  # any loader failure means this source cannot be merged
        reason = cut(" ".join(str(exc).split()), 200)
        raise MergeError(f"cannot load merge source {cut(str(folder), 200)}: {type(exc).__name__}: {reason}") \
            from exc


def _answer(model, tokenizer, question: str, max_new_tokens: int) -> str:
    """A model with a chat template answers through it (``evaluate.answer_question``); an Agent Forge model (its
    tokenizer knows the calculator's tokens) answers as the phases and the playground ask it: greedy, its calculator
    calls run (``tools.generate_with_tools``), the markup kept (``<|tool|>expr<|/tool|><|result|>value``)."""
    from .data.base import TOOL_OPEN
    from .evaluate import answer_question
    from .tools import generate_with_tools

    if getattr(tokenizer, "chat_template", None) or TOOL_OPEN not in tokenizer.get_vocab():
        return answer_question(model, tokenizer, question, max_new_tokens)
    return generate_with_tools(model, tokenizer, [question], max_new_tokens)[0].text


def cmd_ask(args: argparse.Namespace) -> int:
    """``forge ask MODEL QUESTION``: load any model source through ``forgelib.modelio`` (a real model by name, a model
    folder, a ``.forge`` or ``.gguf`` file) and print its greedy answer; load and answer times go to stderr. A source
    that cannot be loaded is one ``forge: ...`` line and exit status 2."""
    import time

    from . import paths
    from .modelio import ModelLoadError, base_lm, load_model, load_tokenizer_for
    from .models.real import REAL_MODELS, real_model_path

    start = time.perf_counter()
    try:
        source = real_model_path(args.model) if args.model in REAL_MODELS else paths.resolve(args.model)
        model, tokenizer = base_lm(load_model(source)), load_tokenizer_for(source)
    except (ModelLoadError, OSError, ValueError) as exc:
        print(f"forge: {exc}", file=sys.stderr)
        return 2
    loaded = time.perf_counter() - start
    print(f"forge ask: {cut(str(source), 200)} loaded in {loaded:.1f} s", file=sys.stderr)
    start = time.perf_counter()
    try:
        answer = _answer(model, tokenizer, args.question, args.max_new_tokens)
    except ValueError as exc:  # a tokenizer with neither pad nor eos, a question longer than the model's context
        print(f"forge: {exc}", file=sys.stderr)
        return 1
    print(answer.strip())
    print(f"forge ask: answered in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


def cmd_bench(argv: list[str]) -> int:
    """``forge bench NAME ARGS...``: every argument after NAME (``--help`` included) goes to NAME's own parser.
    ``forge bench --help`` lists the benchmarks with what each measures; ``forge bench NAME --help`` is answered
    from ``forgelib.bench.options`` without importing the benchmark (torch and the phases take seconds)."""
    from .bench import options

    if not argv or argv[0] in ("-h", "--help"):
        print(options.overview())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"forge bench: unknown benchmark {name!r}; valid: {sorted(BENCHMARKS)}", file=sys.stderr)
        return 2
    if "-h" in rest or "--help" in rest:
        options.build_parser(name).parse_args(rest)  # prints the help and exits 0 (or names a bad option, exit 2)
    return int(importlib.import_module(BENCHMARKS[name]).main(rest) or 0)


def _run_arguments(parser: argparse.ArgumentParser, params_note: str = "parameters/smoke.yaml") -> None:
    """--params, --session and --set: shared by `forge run` and `forge phase`."""
    parser.add_argument("--params", default="parameters/smoke.yaml", action=_StoreGiven, metavar="FILE",
                        help=f"parameter file (YAML) (default: {params_note})")
    parser.add_argument("--session", default=None, type=_session_arg,
                        help="session id: A-Z a-z 0-9 . _ - (default: a new one)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a parameter, e.g. --set cognate.trunk.steps=50 (repeatable)")


def _command(sub, name: str, summary: str, description: str = "", epilog: str | None = None):
    """A ``forge`` subcommand: ``summary`` in ``forge --help``, the plain-text description in its own ``--help``."""
    from .helptext import HelpFormatter, plain_text

    description = description or f"{summary[0].upper()}{summary[1:]}."
    return sub.add_parser(name, help=summary, description=plain_text(description), epilog=epilog,
                          formatter_class=HelpFormatter)


def _add_run(sub) -> None:
    run = _command(sub, "run", "run the pipeline (phase notebooks via papermill)",
                   "Run the pipeline: each phase's notebook in turn (papermill), every handoff checked, a new "
                   "session under outputs/<session>/ unless --resume or --from says otherwise.")
    _run_arguments(run, "parameters/smoke.yaml; with --resume or --from the session's own unless given")
    run.add_argument("--phases", default="all",
                     help="which phases: 'all', a number or name ('2', 'evomerge'), a range ('1-3') or a list ('1,3')")
    again = run.add_mutually_exclusive_group()
    again.add_argument("--resume", metavar="SESSION", default=None, type=_session_arg,
                       help="continue SESSION from its first phase not completed, with its stored parameters "
                            "(--params/--set that change them are refused: use --from)")
    again.add_argument("--from", dest="rerun_from", metavar="SESSION:PHASE", default=None, type=_from_arg,
                       help="a new session (--session, default SESSION-from<N>-<time>) running PHASE onwards "
                            "(or --phases, beginning at PHASE) after SESSION's completed phase PHASE-1, with "
                            "SESSION's parameters changed by --params/--set; SESSION is left as it is")
    run.add_argument("--gates", choices=["enforce", "warn"], default=None,
                     help="enforce (the default, run.gates): a failed gate stops the chain; warn: to explore, a failed "
                          "gate is reported, the phase's models are registered as gate-failed and the chain goes on")
    run.add_argument("--no-notebooks", action="store_true",
                     help="run each phase's calls in this process instead of its notebook (a machine without "
                          "Jupyter; no executed notebooks; the scorecard goes to "
                          "outputs/<session>/09_scorecard/scorecard.json)")


def _add_phase(sub) -> None:
    phase = _command(sub, "phase", "run one phase in this process, without its notebook (under accelerate "
                                   "launch: data-parallel on several processes)")
    phase.add_argument("name", help="phase name or number, e.g. cognate or 1")
    _run_arguments(phase)
    phase.add_argument("--upstream", default=None, metavar="FOLDER",
                       help="the upstream phase folder (default: the newest completed)")


def _add_open(sub) -> None:
    explore = _command(sub, "open", "explore a finished session in JupyterLab without running anything",
                       "Write outputs/<session>/explore/NN_phase.ipynb: a copy of each finished phase's notebook with "
                       "explore set to the session, so its tables, plots and widgets show the finished run (nothing "
                       "trains), and print the JupyterLab command and URL to open it.")
    explore.add_argument("session", type=_session_arg, help="a session under outputs/")
    explore.add_argument("phase", nargs="?", default=None,
                         help="one phase (number or name, e.g. 4 or bitnet); default: every phase that finished")
    explore.add_argument("--port", type=int, default=8888, help="JupyterLab's port in the printed URL (default 8888)")


def _add_registry(sub) -> None:
    reg = _command(sub, "registry", "list the registry: its models (list) or its sessions (sessions)",
                   "List what the registry (outputs/registry.db) holds, as a tab-separated table or as JSON.",
                   epilog="what to list:\n"
                          "  list      one row per registered model: id, session, phase, name, status (active, "
                          "gate-failed, retired: reason), size in MB, parameter count, folder\n"
                          "  sessions  one row per session: id, status, current phase, progress, creation time")
    reg.add_argument("what", choices=["list", "sessions"], nargs="?", default="list",
                     help="list: the models (the default); sessions: the sessions")
    reg.add_argument("--session", default=None, help="list only this session's models")
    reg.add_argument("--json", action="store_true", help="print JSON (every column, unrounded) instead of a table")


def _add_clean(sub) -> None:
    clean = _command(sub, "clean", "delete old sessions (rows, models and folders together; a session in use is "
                                   "skipped)")
    clean.add_argument("--keep", type=_at_least_zero(int), default=None, metavar="N",
                       help="keep the N newest sessions")
    clean.add_argument("--max-age-days", type=_at_least_zero(float), default=None, metavar="D",
                       help="delete sessions older than D days")
    clean.add_argument("--dry-run", action="store_true", help="print what would be deleted and delete nothing")


def _add_merge(sub) -> None:
    merge = _command(sub, "merge", "rebuild a merged model from its recipe YAML or a mergekit configuration")
    merge.add_argument("recipe", help="our recipe YAML, or a mergekit YAML (one with 'merge_method')")
    merge.add_argument("--out", default=None, metavar="DIR",
                       help="output folder, new or empty, outside the outputs root (default: rebuilt/ next to the "
                            "recipe)")
    merge.add_argument("--to-mergekit", default=None, metavar="OUT.yaml",
                       help="write the recipe as a mergekit configuration (notes list what it cannot express) "
                            "instead of merging")
    merge.add_argument("--compare", default=None, type=_model_folder_arg, metavar="FOLDER",
                       help="a saved model folder to compare with, tensor by tensor")
    merge.add_argument("--force", action="store_true",
                       help="write into a non-empty --out folder or over an existing --to-mergekit file (never "
                            "under the outputs root, never into a source)")


def _add_ask(sub) -> None:
    ask = _command(sub, "ask", "ask a model one question and print its greedy answer (any model source, a real "
                               "model by name)",
                   "Load a model source through forgelib.modelio (a model folder, a .forge artifact, a .gguf file, or "
                   "a real model by name: smollm2 after make setup-real) and print its greedy answer to one question: "
                   "through the tokenizer's chat template when it has one, else as the phases prompt their models. A "
                   "Quiet-STaR model answers without thinking; an Agent Forge model runs its calculator calls, as the "
                   "phases ask it (Phase 7's experts are routed in the scorecard's playground, not here). Load and "
                   "answer times go to stderr.")
    ask.add_argument("model", help="a model folder, a .forge or .gguf file (relative paths from the repository root), "
                                   "or a real model's name: smollm2")
    ask.add_argument("question", help="the question, one argument (quote it)")
    ask.add_argument("--max-new-tokens", type=_at_least_one, default=64, metavar="N",
                     help="the most tokens the answer may have (default 64)")


def build_parser() -> argparse.ArgumentParser:
    from .helptext import HelpFormatter

    parser = argparse.ArgumentParser(prog="forge", formatter_class=HelpFormatter,
                                     description="Agent Forge workbench: run the phase pipeline, look at the "
                                                 "registry, clean up, rebuild merges, ask a model, benchmark.",
                                     epilog="forge COMMAND --help describes a command's options; forge bench "
                                            "--help lists the benchmarks.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_run, _add_phase, _add_open, _add_registry, _add_clean, _add_merge, _add_ask):
        add(sub)
    bench = _command(sub, "bench", f"benchmarks: {', '.join(sorted(BENCHMARKS))} (forge bench --help says what "
                                   "each measures; forge bench NAME --help lists its options)")
    bench.add_argument("name", help="the benchmark; its own options follow it")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a registry or file-system problem is one line on stderr and exit status 1 (a damaged registry
    file, refused before anything is written to it: 2)."""
    from .paths import WRITE_ERRNOS, describe_write_error
    from .registry import CorruptRegistryError, RegistryError

    argv = list(sys.argv[1:] if argv is None else argv)
    # The tokenizers' own thread pool keeps a second core busy (seen: a 1-thread Phase-4 run at 2 x 100 % CPU, and
    # 0.04 -> 0.5-0.75 s per step once a second job shared the machine). Threads are torch's, as under `make`.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if argv[:1] == ["bench"]:  # the benchmark parses its own arguments, --help included
        return cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    command = {"run": cmd_run, "phase": cmd_phase, "open": cmd_open, "registry": cmd_registry, "clean": cmd_clean,
               "merge": cmd_merge, "ask": cmd_ask}[args.command]
    try:
        return command(args)
    except CorruptRegistryError as exc:  # refused before anything was written to it
        print(f"forge: {exc}", file=sys.stderr)
        return 2
    except RegistryError as exc:
        print(f"forge: {exc}", file=sys.stderr)
    except OSError as exc:
        message = describe_write_error(exc) if exc.errno in WRITE_ERRNOS else f"{exc.filename}: {exc.strerror or exc}"
        print(f"forge: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
