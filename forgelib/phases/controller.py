"""``PhaseController``: the source design's controller contract (validate_input → execute → validate_output) over
``open_phase`` / ``run_phase``."""
from __future__ import annotations

from typing import Any, Iterable

from .. import paths
from ..results import PhaseResult
from .lifecycle import open_phase, run_phase
from .specs import PHASES, PhaseSpec, get_spec
from .upstream import load_upstream, upstream_model_path


class PhaseController:
    """The source design's controller contract over a phase module (no state beyond its arguments).

    ``validate_input`` → ``execute`` → ``validate_output``; ``execute`` returns the PhaseResult.
    """

    def __init__(self, spec: PhaseSpec | str | int, params_file: str = "parameters/smoke.yaml",
                 overrides: dict | None = None, session: str | None = None, upstream: Any = None,
                 all_specs: Iterable[PhaseSpec] | None = None):

        self.all_specs = list(all_specs) if all_specs is not None else list(PHASES)
        self.spec = spec if isinstance(spec, PhaseSpec) else get_spec(spec, self.all_specs)
        self.params_file, self.overrides, self.session, self.upstream = params_file, overrides, session, upstream

    def validate_input(self, input_models: list | None = None) -> bool:
        """True when the upstream (if any) loads and its models verify; raises UpstreamError otherwise."""
        upstream = load_upstream(self._upstream(input_models))
        if upstream is not None:
            from ..registry import ModelRegistry

            registry = ModelRegistry(paths.registry_path())
            for role in upstream.models:
                upstream_model_path(upstream, role, registry)
            registry.close()
        return True

    def execute(self, input_models: list | None = None) -> PhaseResult:
        ctx = open_phase(self.spec, self.params_file, self.overrides, self.session, self._upstream(input_models),
                         self.all_specs)
        self.session = ctx.session
        return run_phase(ctx)

    def validate_output(self, result: PhaseResult) -> bool:
        return result.ok and result.gate_passed and bool(result.models)

    def _upstream(self, input_models: list | None) -> Any:
        return input_models[0] if input_models else self.upstream
