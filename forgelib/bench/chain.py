"""`forge bench chain`: the whole chain with several seeds at 1 and 2 threads — do its verdicts hold on any machine?

Another machine's floating point changes every number a run measures a little; a gate whose bound sits within that
noise fails there. Different seeds (initialisation and data: ``run.seed``) and thread counts (a different summation
order in every matrix product, as another machine would have) give the spread a gate must tolerate. Each run is
``forge run --no-notebooks`` in a fresh session (a failed chain does not stop the benchmark); then, from the result
files, tables of:

* every gate check's value, bound and slack (value − bound, in the direction that passes) per run, and its minimum
  over the runs: a check with a small minimum slack is one a new machine may fail;
* every phase's per-family accuracy after the phase (its guard, ``forgelib.suite``), mean and range over the runs;
* the chain gate: the final artifact against the Phase-1 trunk per family.

    forge bench chain --params parameters/smoke.yaml --seeds 5 --threads 1,2
    forge bench chain --report outputs/bench/chain-smoke.json      # tables of an earlier run, nothing run
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .. import paths
from .options import build_parser


def run_chain(params: str, seed: int, threads: int, prefix: str, extra: list[str]) -> dict[str, Any]:
    """One chain in a fresh session (a subprocess); its exit code, seconds and session."""
    session = f"{prefix}-s{seed}-t{threads}"
    cmd = [sys.executable, "-m", "forgelib.cli", "run", "--no-notebooks", "--params", params, "--session", session,
           "--set", f"run.seed={seed}", "--set", f"run.threads={threads}", "--set", "run.quiet=true",
           "--set", "run.tracking=jsonl", *extra]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=paths.repo_root())
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
    return {"session": session, "seed": seed, "threads": threads, "returncode": proc.returncode,
            "seconds": round(time.perf_counter() - started, 1), "tail": tail}


def collect(session: str) -> dict[str, Any]:
    """The gate checks, per-family guard accuracies and the chain verdict a session's files hold."""
    from ..phases import PHASES
    from ..results import PhaseResult
    from ..suite import read_guard

    root = paths.outputs_root() / session
    out: dict[str, Any] = {"phases": {}, "chain": None}
    for spec in PHASES:
        folder = root / spec.dirname
        if not (folder / "result.json").is_file():
            continue
        result = PhaseResult.load(folder)
        guard = read_guard(folder) or {}
        out["phases"][spec.dirname] = {
            "status": result.status, "gate_passed": result.gate_passed, "seconds": result.duration_s,
            "checks": [{"name": c.name, "value": c.value, "bound": c.bound, "op": c.op, "passed": c.passed,
                        "slack": slack(c.value, c.bound, c.op)} for c in result.gate],
            "guard": {f: {"before": v["before"], "after": v["after"], "n": v["n"]}
                      for f, v in (guard.get("families") or {}).items()}}
    chain = root / "09_scorecard" / "chain.json"
    if chain.is_file():
        data = json.loads(chain.read_text())
        out["chain"] = {"passed": data["passed"], "table": data["table"]}
    return out


def slack(value: float, bound: float, op: str) -> float | None:
    """How far a check's value lies on its passing side of the bound (negative: failed)."""
    if value is None or bound is None:
        return None
    return round(value - bound if op in (">", ">=") else bound - value, 4)


def tables(runs: list[dict]) -> dict[str, list[dict]]:
    """The benchmark's tables (module docstring) from the collected runs."""
    checks: dict[tuple[str, str], list[float]] = {}
    accuracy: dict[tuple[str, str], list[float]] = {}
    for run in runs:
        for phase, data in run["collected"]["phases"].items():
            for c in data["checks"]:
                checks.setdefault((phase, c["name"]), []).append(c["slack"])
            for family, row in data["guard"].items():
                accuracy.setdefault((phase, family), []).append(row["after"])
                if phase.startswith("02"):
                    accuracy.setdefault(("01_cognate (trunk)", family), []).append(row["before"])
    check_rows = [{"phase": p, "check": n, "runs": len(v), "min_slack": min(x for x in v if x is not None),
                   "mean_slack": round(statistics.mean(x for x in v if x is not None), 4),
                   "failed": sum(1 for x in v if x is not None and x < 0)}
                  for (p, n), v in sorted(checks.items()) if any(x is not None for x in v)]
    acc_rows = [{"phase": p, "family": f, "runs": len(v), "mean": round(statistics.mean(v), 4),
                 "min": min(v), "max": max(v)} for (p, f), v in sorted(accuracy.items())]
    chain_rows = []
    for run in runs:
        chain = run["collected"]["chain"]
        chain_rows.append({"session": run["session"], "chain_passed": None if chain is None else chain["passed"],
                           **({r["family"]: f"{r['before']:.3f}→{r['after']:.3f}" for r in chain["table"]}
                              if chain else {})})
    return {"checks": check_rows, "accuracy": acc_rows, "chain": chain_rows}


def markdown(rows: list[dict]) -> str:
    if not rows:
        return "(none)"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("chain")
    args = parser.parse_args(argv)
    name = Path(args.params).stem
    out = paths.bench_output(f"chain-{name}", args.out, stamp=False)
    if args.report:
        data = json.loads(paths.resolve(args.report).read_text())
    else:
        prefix = args.prefix or f"bench-chain-{name}-{time.strftime('%m%d%H%M')}"
        extra = [x for kv in args.set for x in ("--set", kv)]
        runs = []
        for seed in range(args.seed_start, args.seed_start + args.seeds):
            for threads in (int(t) for t in args.threads.split(",")):
                run = run_chain(args.params, seed, threads, prefix, extra)
                run["collected"] = collect(run["session"])
                runs.append(run)
                print(f"[bench chain] {run['session']}: exit {run['returncode']} in {run['seconds']} s",
                      flush=True)
        data = {"params": args.params, "runs": runs, "tables": tables(runs)}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1))
    for title, rows in data["tables"].items():
        print(f"\n## {title}\n\n{markdown(rows)}")
    completed = sum(r["returncode"] == 0 for r in data["runs"])
    print(f"\n{completed}/{len(data['runs'])} chains completed with every gate held; JSON: {paths.relative(out)}")
    return 0 if completed == len(data["runs"]) else 1
