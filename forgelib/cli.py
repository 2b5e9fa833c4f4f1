"""`forge`: run the pipeline or some phases, resume a session, list the registry, clean up, benchmark."""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
from typing import Any, Callable


from .params import YamlError, load_yaml

BENCHMARKS = {
    "grokking": "forgelib.bench.grokking",
    "optim-lm": "forgelib.bench.optim_lm",
    "cognate": "forgelib.bench.cognate",
    "evomerge": "forgelib.bench.evomerge",
    "learn": "forgelib.bench.learn",
    "quietstar": "forgelib.bench.quietstar",
    "bitnet": "forgelib.bench.bitnet",
    "curriculum": "forgelib.bench.curriculum",
    "baking": "forgelib.bench.baking",
    "experts": "forgelib.bench.experts",
    "compression": "forgelib.bench.compression",
    "chain": "forgelib.bench.chain",
}


def _parse_set(items: list[str]) -> dict:
    """``--set cognate.trunk.steps=20`` → ``{"cognate.trunk.steps": 20}`` (values parsed as YAML)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"forge: --set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = load_yaml(value, f"--set {key.strip()[:80]}")
        except YamlError as exc:
            raise SystemExit(f"forge: {exc}") from None
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


def cmd_run(args: argparse.Namespace) -> int:
    from .phases import PhaseError
    from .pipeline import PipelineError, RefusedError, run_pipeline, summary_table
    from .session import SessionInUseError

    # --resume and --from start from a session's stored parameters: --params counts only when given (not its
    # default). A resume refuses --params/--set that change a value (exit 2, naming --from); --from applies them.
    plain = args.resume is None and args.rerun_from is None
    params = args.params if plain or getattr(args, "params_given", False) else None
    try:
        outcomes = run_pipeline(params, args.phases, args.resume or args.session, _parse_set(args.set),
                                resume=args.resume is not None, notebooks=not args.no_notebooks,
                                rerun_from=args.rerun_from)
    except RefusedError as exc:
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
        result = run_phase(open_phase(args.name, args.params, _parse_set(args.set), args.session, args.upstream))
    except (PhaseError, SessionInUseError, ValueError, KeyError) as exc:
        print(f"forge: {exc}", file=sys.stderr)
        return 1
    if not is_follower():
        print(json.dumps({"session": result.session, "phase": result.phase, "status": result.status,
                          "seconds": result.duration_s, "metrics": result.metrics}, indent=1, default=str))
    return 0


def cmd_registry(args: argparse.Namespace) -> int:
    from . import paths
    from .registry import ModelRegistry

    with ModelRegistry(paths.registry_path()) as reg:
        if args.what == "sessions":
            rows = reg.list_sessions()
            keys = ["id", "status", "current_phase", "progress", "created_at"]
        else:
            rows = reg.list_models(session_id=args.session)
            keys = ["id", "session_id", "phase_name", "model_name", "size_mb", "parameter_count", "model_path"]
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    print("\t".join(keys))
    for row in rows:
        print("\t".join(str(row.get(k, "")) for k in keys))
    return 0


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
    as a mergekit configuration instead."""
    from . import paths
    from .merge import MergeError
    from .merge.mergekit_yaml import count_layers, merge_from_mergekit, read_mergekit_file, save_mergekit
    from .merge.models import load_recipe, rebuild_from_recipe, verify_sources
    from .modelio import load_causal_lm

    recipe = paths.resolve(args.recipe)
    mergekit = read_mergekit_file(recipe)
    try:
        if args.to_mergekit:
            if mergekit:
                raise MergeError(f"{recipe} is already a mergekit configuration")
            ours = load_recipe(recipe)
            layers = count_layers(paths.resolve(ours.base)) if ours.base else None
            notes = save_mergekit(ours, paths.resolve(args.to_mergekit), num_layers=layers)
            for note in notes:
                print(f"forge merge: not expressible in mergekit: {note}", file=sys.stderr)
            print(f"mergekit configuration written to {paths.resolve(args.to_mergekit)}")
            return 0
        if mergekit:
            model, _ = merge_from_mergekit(mergekit, _load_source)
            if mergekit.get("tokenizer_source"):
                print(f"forge merge: note: no tokenizer is written; take it from {mergekit['tokenizer_source']!r}",
                      file=sys.stderr)
        else:
            unchecked = verify_sources(load_recipe(recipe), paths.resolve)
            if unchecked:
                print(f"forge merge: warning: the recipe holds no checksum for {unchecked}; they are not verified",
                      file=sys.stderr)
            model = rebuild_from_recipe(recipe, _load_source)
    except (MergeError, OSError, ValueError) as exc:
        print(f"forge merge: {exc}", file=sys.stderr)
        return 1
    out = paths.resolve(args.out) if args.out else recipe.parent / "rebuilt"
    model.save_pretrained(out, safe_serialization=True)
    print(f"{'merged' if mergekit else 'rebuilt'} model written to {out}")
    if args.compare:
        reference = load_causal_lm(paths.resolve(args.compare)).state_dict()
        state = model.state_dict()
        same = state.keys() == reference.keys() and all(state[k].equal(reference[k]) for k in state)
        print(f"bit-identical to {args.compare}: {same}")
        return 0 if same else 1
    return 0


def _load_source(name: str):
    """Load a recipe's source model folder; an unreadable folder or a broken config.json is a ValueError
    naming the folder."""
    from . import paths
    from .modelio import load_causal_lm

    folder = paths.resolve(name)
    try:
        return load_causal_lm(folder)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # json errors are ValueErrors
        raise ValueError(f"cannot load source model {folder}: {type(exc).__name__}: {exc}") from exc


def cmd_bench(argv: list[str]) -> int:
    """``forge bench NAME ARGS...``: every argument after NAME (``--help`` included) goes to NAME's own parser."""
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: forge bench NAME [ARGS...]\n\nbenchmarks: {', '.join(sorted(BENCHMARKS))}\n"
              "`forge bench NAME --help` shows a benchmark's own options")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"forge bench: unknown benchmark {name!r}; valid: {sorted(BENCHMARKS)}", file=sys.stderr)
        return 2
    return int(importlib.import_module(BENCHMARKS[name]).main(rest) or 0)


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    """--params, --session and --set: shared by `forge run` and `forge phase`."""
    parser.add_argument("--params", default="parameters/smoke.yaml", action=_StoreGiven,
                        help="parameter set (YAML)")
    parser.add_argument("--session", default=None, type=_session_arg,
                        help="session id: A-Z a-z 0-9 . _ - (default: a new one)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a parameter, e.g. --set cognate.trunk.steps=50")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forge", description="Agent Forge workbench")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipeline (phase notebooks via papermill)")
    _run_arguments(run)
    run.add_argument("--phases", default="all", help="'all', '1-3', '2', '1,3'")
    again = run.add_mutually_exclusive_group()
    again.add_argument("--resume", metavar="SESSION", default=None, type=_session_arg,
                       help="continue SESSION from its first phase not completed, with its stored parameters "
                            "(--params/--set that change them are refused: use --from)")
    again.add_argument("--from", dest="rerun_from", metavar="SESSION:PHASE", default=None, type=_from_arg,
                       help="a new session (--session, default SESSION-from<N>-<time>) running PHASE onwards "
                            "(or --phases, beginning at PHASE) after SESSION's completed phase PHASE-1, with "
                            "SESSION's parameters changed by --params/--set; SESSION is left as it is")
    phase = sub.add_parser("phase", help="run one phase in this process, without its notebook (under "
                                         "`accelerate launch`: data-parallel on several processes)")
    phase.add_argument("name", help="phase name or number, e.g. cognate or 1")
    _run_arguments(phase)
    phase.add_argument("--upstream", default=None, help="the upstream phase folder (default: the newest completed)")
    run.add_argument("--no-notebooks", action="store_true",
                     help="run each phase's calls in this process instead of its notebook (a machine without "
                          "Jupyter; no executed notebooks; the scorecard goes to "
                          "outputs/<session>/09_scorecard/scorecard.json)")
    reg = sub.add_parser("registry", help="list the model registry")
    reg.add_argument("what", choices=["list", "sessions"], nargs="?", default="list")
    reg.add_argument("--session", default=None)
    reg.add_argument("--json", action="store_true")
    clean = sub.add_parser("clean", help="delete old sessions (rows, models and folders together; "
                                         "a session in use is skipped)")
    clean.add_argument("--keep", type=_at_least_zero(int), default=None, help="keep the N newest sessions")
    clean.add_argument("--max-age-days", type=_at_least_zero(float), default=None,
                       help="delete sessions older than D days")
    clean.add_argument("--dry-run", action="store_true")
    merge = sub.add_parser("merge", help="rebuild a merged model from its recipe YAML or a mergekit configuration")
    merge.add_argument("recipe", help="our recipe YAML, or a mergekit YAML (one with 'merge_method')")
    merge.add_argument("--out", default=None, help="output folder (default: rebuilt/ next to the recipe)")
    merge.add_argument("--to-mergekit", default=None, metavar="OUT.yaml",
                       help="write the recipe as a mergekit configuration (notes list what it cannot express) "
                            "instead of merging")
    merge.add_argument("--compare", default=None, help="a saved model folder to compare with, tensor by tensor")
    bench = sub.add_parser("bench", help=f"benchmarks: {', '.join(sorted(BENCHMARKS))} "
                                         "(`forge bench NAME --help` for a benchmark's options)")
    bench.add_argument("name")
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
    command = {"run": cmd_run, "phase": cmd_phase, "registry": cmd_registry, "clean": cmd_clean,
               "merge": cmd_merge}[args.command]
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
