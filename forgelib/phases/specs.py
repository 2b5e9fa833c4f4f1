"""The phases that really run, in order (``PHASES``), and how a phase is named on the command line and in notebooks
(``get_spec``, ``select``). A phase is added here when its module and notebook exist."""
from __future__ import annotations

import dataclasses
import importlib


@dataclasses.dataclass(frozen=True)
class PhaseSpec:
    """A phase: its number, name (= YAML section), implementing module and notebook."""

    number: int
    name: str
    module: str
    notebook: str
    title: str = ""

    @property
    def dirname(self) -> str:
        return f"{self.number:02d}_{self.name}"

    def load(self):
        """The phase module (imported on demand: phases pull in heavy libraries)."""
        return importlib.import_module(self.module)

    @property
    def params_cls(self) -> type:
        return self.load().Params


PHASES: list[PhaseSpec] = [
    PhaseSpec(1, "cognate", "forgelib.phases.cognate", "notebooks/01_cognate.ipynb",
              "Cognate: trunk + three specialists"),
    PhaseSpec(2, "evomerge", "forgelib.phases.evomerge", "notebooks/02_evomerge.ipynb",
              "EvoMerge: CMA-ES over merge recipes"),
    PhaseSpec(3, "quietstar", "forgelib.phases.quietstar", "notebooks/03_quietstar.ipynb",
              "Quiet-STaR: thinking before each answer token"),
    PhaseSpec(4, "bitnet", "forgelib.phases.bitnet", "notebooks/04_bitnet.ipynb",
              "BitNet: ternary weights by quantization-aware training, packed"),
    PhaseSpec(5, "curriculum", "forgelib.phases.curriculum", "notebooks/05_curriculum.ipynb",
              "Curriculum: training at the edge of ability, with a calculator, self-modeling and dreaming"),
    PhaseSpec(6, "baking", "forgelib.phases.baking", "notebooks/06_baking.ipynb",
              "Baking: tool and persona prompts baked into the weights (KL + LoRA)"),
    PhaseSpec(7, "experts", "forgelib.phases.experts", "notebooks/07_experts.ipynb",
              "Experts: self-discovered SVF experts with two-pass routing"),
    PhaseSpec(8, "compression", "forgelib.phases.compression", "notebooks/08_compression.ipynb",
              "Compression: the model as one small artifact, in gated stages with rollback"),
]


SELECTION_FORMS = "'all', a phase number or name ('2', 'evomerge'), a range ('1-2') or a list ('1,2')"


class UnknownPhaseError(KeyError):
    """A phase key or a ``--phases`` selection that names no phase; the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def get_spec(key: str | int, specs: list[PhaseSpec] | None = None) -> PhaseSpec:
    """A phase by name or number; an unknown key fails with the list of valid ones."""
    specs = PHASES if specs is None else specs
    for spec in specs:
        if key == spec.name or key == spec.number or (isinstance(key, str) and key == spec.dirname):
            return spec
    raise UnknownPhaseError(f"unknown phase {key!r}; valid: {[f'{s.number}:{s.name}' for s in specs]}")


def _selection_keys(selection: str) -> list:
    """The phase keys of a selection string such as '2', '1-3' or '1,evomerge' (UnknownPhaseError if malformed)."""
    keys: list = []
    for part in (p.strip() for p in selection.split(",")):
        lo, dash, hi = part.partition("-")
        if dash and lo.strip().isdigit() and hi.strip().isdigit() and int(lo) <= int(hi):
            keys.extend(range(int(lo), int(hi) + 1))
        elif part and not dash:
            keys.append(int(part) if part.isdigit() else part)
        else:
            raise UnknownPhaseError(f"invalid phase selection {selection!r}: use {SELECTION_FORMS}")
    return keys


def select(selection: str | list | None, specs: list[PhaseSpec] | None = None) -> list[PhaseSpec]:
    """Phases chosen by 'all', '2', '1-3', '1,3' or a list of names/numbers, in pipeline order."""
    specs = PHASES if specs is None else specs
    if selection in (None, "all", ""):
        return list(specs)
    keys = _selection_keys(selection) if isinstance(selection, str) else list(selection)
    chosen = {get_spec(k, specs).number for k in keys}
    return [s for s in specs if s.number in chosen]


__all__ = ["PHASES", "PhaseSpec", "SELECTION_FORMS", "UnknownPhaseError", "get_spec", "select"]
