"""ipywidgets inspectors. Each returns a widget; the notebook displays it."""
from __future__ import annotations

import json
from typing import Iterable


def result_browser(outcomes: Iterable):
    """A dropdown over the pipeline's phases showing each phase's full result.json."""
    import ipywidgets as w

    results = {o.spec.dirname: o.result for o in outcomes if o.result is not None}
    out = w.Output()
    pick = w.Dropdown(options=list(results), description="phase")

    def show(change=None):
        out.clear_output()
        with out:
            if pick.value:
                print(json.dumps(results[pick.value].to_dict(), indent=2, default=str))

    pick.observe(show, names="value")
    show()
    return w.VBox([pick, out])
