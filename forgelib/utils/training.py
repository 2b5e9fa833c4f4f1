"""Training issues in a loss history: NaN/inf, divergence and plateau (``detect_training_issues``)."""
from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Iterable


#: Issue kinds that :func:`detect_training_issues` reports.
ISSUE_KINDS = ("nan", "divergence", "plateau")


@dataclass(frozen=True)
class TrainingIssue:
    """One finding about a loss history; ``str()`` gives its message."""

    kind: str
    step: int
    message: str

    def __str__(self) -> str:
        return self.message


class TrainingIssueError(RuntimeError):
    """A training issue of a kind listed in ``raise_on``; ``issue`` holds the finding."""

    def __init__(self, issue: TrainingIssue):
        super().__init__(issue.message)
        self.issue = issue


def _as_steps(history: Any) -> tuple[list[int], list[float]]:
    """Steps and losses from a sequence of losses (step = index), of (step, loss) pairs, or a
    mapping step -> loss."""
    if isinstance(history, Mapping):
        items = list(history.items())
    else:
        history = list(history)
        pairs = bool(history) and all(isinstance(h, (tuple, list)) and len(h) == 2 for h in history)
        items = history if pairs else list(enumerate(history))
    try:
        return [int(s) for s, _ in items], [float(v) for _, v in items]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"loss_history must hold numbers or (step, loss) pairs: {exc}") from exc


def _nan_issue(steps: list[int], losses: list[float]) -> TrainingIssue | None:
    for step, loss in zip(steps, losses):
        if not math.isfinite(loss):
            label = "NaN" if math.isnan(loss) else "inf"
            return TrainingIssue("nan", step, f"{label} loss at step {step}")
    return None


def _divergence_issue(steps: list[int], losses: list[float], window: int,
                      factor: float, min_increase: float = 0.0) -> TrainingIssue | None:
    """Recent mean above ``factor`` × the best mean of ``window`` consecutive losses seen before the recent
    window. Means, not single losses, because batches differ (a batch of short easy problems can score far
    below the average, and a later mixed batch is not divergence); the best is taken before the window so
    that a steep but healthy drop inside it is not called divergence; skipped for a best ≤ 0, where a ratio
    means nothing. The rise must also exceed ``min_increase`` (absolute): near zero a ratio means little
    (0.009 -> 0.036 nats is 4x, yet a model that answers almost everything right)."""
    if len(losses) <= window:
        return None
    earlier = losses[:-window]
    span = min(window, len(earlier))
    sums = list(itertools.accumulate(earlier, initial=0.0))  # prefix sums: every window mean in O(n)
    best = min(sums[i + span] - sums[i] for i in range(len(earlier) - span + 1)) / span
    recent = sum(losses[-window:]) / window
    if best <= 0 or recent <= factor * best or recent - best <= min_increase:
        return None
    return TrainingIssue("divergence", steps[-1],
                         f"loss diverged at step {steps[-1]}: mean of the last {window} losses "
                         f"{recent:.4g} > {factor:g} x best earlier mean of {span} losses {best:.4g}")


def _plateau_issue(steps: list[int], losses: list[float], patience: int,
                   tol: float) -> TrainingIssue | None:
    """No improvement of the best loss by more than ``tol`` (relative) in the last ``patience``
    entries."""
    if len(losses) <= patience:
        return None
    best_before, best_recent = min(losses[:-patience]), min(losses[-patience:])
    if best_before - best_recent > tol * abs(best_before):
        return None
    return TrainingIssue("plateau", steps[-1],
                         f"loss plateau at step {steps[-1]}: best loss {best_recent:.4g} in the last "
                         f"{patience} entries vs {best_before:.4g} before (tolerance {tol:g})")


def _check_issue_args(window: int, divergence_factor: float, plateau_patience: int,
                      plateau_tol: float, raise_on: Iterable[str]) -> set[str]:
    for name, value in (("window", window), ("plateau_patience", plateau_patience)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not divergence_factor > 0 or not plateau_tol >= 0:
        raise ValueError(f"divergence_factor must be > 0 and plateau_tol >= 0, got "
                         f"{divergence_factor!r} and {plateau_tol!r}")
    kinds = {raise_on} if isinstance(raise_on, str) else set(raise_on)
    unknown = kinds - set(ISSUE_KINDS)
    if unknown:
        raise ValueError(f"unknown raise_on kinds {sorted(unknown)}; valid: {', '.join(ISSUE_KINDS)}")
    return kinds


def detect_training_issues(loss_history: Any, window: int = 10, divergence_factor: float = 3.0,
                           plateau_patience: int = 50, plateau_tol: float = 1e-3, divergence_min_increase: float = 0.0,
                           raise_on: Iterable[str] = ("nan", "divergence")) -> list[TrainingIssue]:
    """Find NaN/inf losses, divergence and plateaus in a loss history.

    ``loss_history``: losses (the step is the index), (step, loss) pairs, or a step -> loss mapping.
    - nan: the first non-finite loss ("NaN loss at step k");
    - divergence: the mean of the last ``window`` losses exceeds ``divergence_factor`` × the best
      mean of ``window`` consecutive losses before that window (positive losses), and by more than
      ``divergence_min_increase`` in absolute terms;
    - plateau: the best loss of the last ``plateau_patience`` entries improves on the best before
      them by no more than ``plateau_tol`` × |that best| (a relative tolerance).
    Divergence and plateau look only at the losses before the first non-finite one. Kinds in
    ``raise_on`` raise ``TrainingIssueError``; the others are returned as ``TrainingIssue`` entries.
    """
    raising = _check_issue_args(window, divergence_factor, plateau_patience, plateau_tol, raise_on)
    steps, losses = _as_steps(loss_history)
    issues = []
    nan = _nan_issue(steps, losses)
    if nan is not None:
        cut = steps.index(nan.step)
        steps, losses = steps[:cut], losses[:cut]
    for issue in (nan, _divergence_issue(steps, losses, window, divergence_factor, divergence_min_increase),
                  _plateau_issue(steps, losses, plateau_patience, plateau_tol)):
        if issue is None:
            continue
        if issue.kind in raising:
            raise TrainingIssueError(issue)
        issues.append(issue)
    return issues
