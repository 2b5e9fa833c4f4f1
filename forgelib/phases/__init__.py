"""The phases: their list and names (``specs``), the contract every phase module follows and the run lifecycle
(``base``), the data and scoring settings phases share (``common``), and one module per phase."""
from __future__ import annotations

from .base import (GateFailedError, OutputNotWritableError, PhaseContext, PhaseController, PhaseError,
                   UpstreamError, open_phase, run_phase)
from .specs import PHASES, SELECTION_FORMS, PhaseSpec, UnknownPhaseError, get_spec, select  # noqa: F401

__all__ = ["PHASES", "PhaseSpec", "PhaseContext", "PhaseController", "PhaseError", "GateFailedError",
           "UpstreamError", "OutputNotWritableError", "UnknownPhaseError", "get_spec", "select", "open_phase",
           "run_phase"]
