"""The phase contract and its run, in one place to import from (every name here lives in a module of its own job):

* ``contract``: ``PhaseContext`` (what a phase's ``run`` gets: params, session, folder, upstream, registry, tracker;
  ``save_model``, ``guard``) and ``write_model_folder``; the module docstring states the contract;
* ``upstream``: which earlier run a phase takes and its models verified against the registry's checksums;
* ``lifecycle``: ``open_phase``, ``run_phase``, ``open_finished`` and the parameter loading they do;
* ``errors``: ``PhaseError`` and its kinds, ``as_phase_error``;
* ``controller``: ``PhaseController``, the source design's controller contract;
* ``specs``: ``PhaseSpec`` (a phase's number, name, module and notebook) and the ordered ``PHASES``.

Phases hand over through files and the registry (model folders + result.json), never through objects in memory.
"""
from __future__ import annotations

from .contract import PhaseContext, write_model_folder
from .controller import PhaseController
from .errors import (DamagedResultError, GateFailedError, NothingToExploreError, OutputNotWritableError, PhaseError,
                     UpstreamError, as_phase_error, os_error_code)
from .lifecycle import (SHARED_SECTIONS, check_device, check_finished, finished_sessions, gate_failure_message,
                        gate_warning, load_guard_params, load_phase_params, new_session_id, now_iso, open_finished,
                        open_phase, quiet_library_bars, run_phase, session_exists)
from .specs import PHASES, PhaseSpec, get_spec
from .upstream import (checked_completed_result, completed_result, describe_upstream, find_upstream,
                       latest_completed, legacy_suite, load_upstream, phase_dir, upstream_line, upstream_model_path,
                       upstream_record, verified_model_path)

__all__ = ["PHASES", "SHARED_SECTIONS", "DamagedResultError", "GateFailedError", "NothingToExploreError",
           "OutputNotWritableError", "PhaseContext", "PhaseController", "PhaseError", "PhaseSpec", "UpstreamError",
           "as_phase_error", "check_device", "check_finished", "checked_completed_result", "completed_result",
           "describe_upstream", "find_upstream", "finished_sessions", "gate_failure_message", "gate_warning",
           "get_spec", "latest_completed", "legacy_suite", "load_guard_params", "load_phase_params", "load_upstream",
           "new_session_id", "now_iso", "open_finished", "open_phase", "os_error_code", "phase_dir",
           "quiet_library_bars", "run_phase", "session_exists", "upstream_line", "upstream_model_path",
           "upstream_record", "verified_model_path", "write_model_folder"]
