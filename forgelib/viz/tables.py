"""Tables for the notebooks: a phase's parameters and run context, one key per row, instead of one long repr."""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable

from .. import paths


class FullTable:
    """A pandas DataFrame (``frame``) shown in full in a notebook and a terminal: no cell cut to 50 characters,
    no rows hidden."""

    def __init__(self, frame: Any):
        self.frame = frame

    def _repr_html_(self) -> str:
        import pandas as pd

        with pd.option_context("display.max_colwidth", None, "display.max_rows", None):
            return self.frame.style.set_properties(**{"text-align": "left"}).to_html()

    def __repr__(self) -> str:
        """Plain text: one ``name  value`` line per row, values left-aligned (a one-column table), else the
        frame's full text."""
        import pandas as pd

        if len(self.frame.columns) == 1:
            width = max((len(str(i)) for i in self.frame.index), default=0)
            return "\n".join(f"{str(i):<{width}}  {v}" for i, v in self.frame.iloc[:, 0].items())
        with pd.option_context("display.max_colwidth", None, "display.max_rows", None, "display.width", 200):
            return self.frame.to_string()


def flatten_params(params: Any, prefix: str = "") -> dict[str, Any]:
    """``{dotted.key: value}`` of a parameter dataclass: nested dataclasses, and dicts of them (e.g. one stage
    per specialist), are flattened; lists, tuples and plain dicts stay one value."""
    flat: dict[str, Any] = {}
    for field in dataclasses.fields(params):
        value, name = getattr(params, field.name), f"{prefix}{field.name}"
        if dataclasses.is_dataclass(value):
            flat.update(flatten_params(value, f"{name}."))
        elif isinstance(value, dict) and value and all(dataclasses.is_dataclass(v) for v in value.values()):
            for key, item in value.items():
                flat.update(flatten_params(item, f"{name}.{key}."))
        else:
            flat[name] = value
    return flat


def params_rows(params: Any) -> dict[str, str]:
    """One row per top-level parameter; a nested group (``model``, a training stage) is one row of
    ``key=value`` pairs."""
    rows: dict[str, Any] = {}
    for key, value in flatten_params(params).items():
        group, _, leaf = key.rpartition(".")
        if group:
            rows.setdefault(group, []).append(f"{leaf}={_short(value)}")
        else:
            rows[key] = _short(value)
    return {k: ", ".join(v) if isinstance(v, list) else v for k, v in rows.items()}


def params_table(params: Any) -> FullTable:
    """A phase's parameters as a table (``parameter`` → ``value``): one row per parameter or group."""
    import pandas as pd

    rows = [{"parameter": key, "value": value} for key, value in params_rows(params).items()]
    return FullTable(pd.DataFrame(rows).set_index("parameter"))


def context_table(ctx: Any) -> FullTable:
    """The run context (session, output folder, parameter file, device, upstream and how it was chosen)
    followed by the parameters, as one two-column table; a parameter the phase's settings leave unused (its params'
    ``unused()``) says so beside its value."""
    import pandas as pd

    from ..phases.base import describe_upstream

    facts = {"session": ctx.session, "output folder": paths.relative(ctx.dir),
             "parameter file": paths.relative(ctx.params_file), "device": ctx.device,
             "upstream": describe_upstream(ctx.upstream, getattr(ctx, "upstream_how", "given"))}
    rows = [{"parameter": k, "value": v} for k, v in facts.items()]
    unused = ctx.params.unused() if hasattr(ctx.params, "unused") else {}  # e.g. a pretrained trunk's shapes
    rows += [{"parameter": f"{ctx.spec.name}.{k}", "value": f"{v} ({unused[k]})" if k in unused else v}
             for k, v in params_rows(ctx.params).items()]
    return FullTable(pd.DataFrame(rows).set_index("parameter"))


def headline_text(metrics: dict[str, Any], keys: Iterable[str] | None = None, limit: int = 6) -> str:
    """A compact ``key value · key value`` line of the given metric ``keys`` (default: the first ``limit``)."""
    keys = [k for k in keys if k in metrics] if keys else list(metrics)[:limit]
    return " · ".join(f"{k} {_short(metrics[k])}" for k in keys)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def guard_table(result: Any):
    """The phase's guard (``forgelib.suite``) as a table: per family of the input's suite the questions asked, the
    accuracy before (the input model) and after (the phase's model), the difference, its lower confidence bound
    against the bound −margin, the questions the margin needed, and the verdict; the pooled suite last."""
    import pandas as pd

    from ..suite import read_guard

    path = (getattr(result, "artifacts", None) or {}).get("guard")
    data = read_guard(paths.resolve(path).parent) if path else None
    if not data:
        return pd.DataFrame([{"note": "this phase ran no guard"}])
    frame = pd.DataFrame(data["table"])
    frame.attrs["note"] = (f"{data['labels'][0]} → {data['labels'][1]}, margin {data['margin']:g}: "
                           + ("every family kept" if data["passed"] else "a family was lost"))
    return frame
