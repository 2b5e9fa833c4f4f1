"""The ordered list of phases that really run. A phase is added here when its module and notebook exist."""
from __future__ import annotations

from .base import (GateFailedError, OutputNotWritableError, PhaseContext, PhaseController, PhaseError,
                   PhaseSpec, UpstreamError, open_phase, run_phase)

PHASES: list[PhaseSpec] = [
    PhaseSpec(1, "cognate", "forgelib.phases.cognate", "notebooks/01_cognate.ipynb",
              "Cognate: trunk + three specialists"),
    PhaseSpec(2, "evomerge", "forgelib.phases.evomerge", "notebooks/02_evomerge.ipynb",
              "EvoMerge: CMA-ES over merge recipes"),
]


def get_spec(key: str | int, specs: list[PhaseSpec] | None = None) -> PhaseSpec:
    """A phase by name or number; an unknown key fails with the list of valid ones."""
    specs = PHASES if specs is None else specs
    for spec in specs:
        if key == spec.name or key == spec.number or (isinstance(key, str) and key == spec.dirname):
            return spec
    raise KeyError(f"unknown phase {key!r}; valid: {[f'{s.number}:{s.name}' for s in specs]}")


def select(selection: str | list | None, specs: list[PhaseSpec] | None = None) -> list[PhaseSpec]:
    """Phases chosen by 'all', '2', '1-3', '1,3' or a list of names/numbers, in pipeline order."""
    specs = PHASES if specs is None else specs
    if selection in (None, "all", ""):
        return list(specs)
    if isinstance(selection, str):
        keys: list = []
        for part in selection.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                keys.extend(range(lo, hi + 1))
            else:
                keys.append(int(part) if part.isdigit() else part)
    else:
        keys = list(selection)
    chosen = {get_spec(k, specs).number for k in keys}
    return [s for s in specs if s.number in chosen]


__all__ = ["PHASES", "PhaseSpec", "PhaseContext", "PhaseController", "PhaseError", "GateFailedError",
           "UpstreamError", "OutputNotWritableError", "get_spec", "select", "open_phase", "run_phase"]
