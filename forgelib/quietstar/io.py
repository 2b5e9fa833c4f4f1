"""A Quiet-STaR model folder on disk: the base as a normal HF (or packed ternary) folder plus the mixing head and
thought embeddings (``quietstar.safetensors``) and the settings (``quietstar.json``) next to it. Reading one back is
``forgelib.modelio``'s job (``load_model``)."""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

EXTRA_FILE, CONFIG_FILE = "quietstar.safetensors", "quietstar.json"


def is_quietstar(path: str | Path) -> bool:
    """Does the model folder hold a Quiet-STaR model (the base plus quietstar.json / .safetensors)?"""
    return (Path(path) / CONFIG_FILE).is_file() and (Path(path) / EXTRA_FILE).is_file()


def save_quietstar(model: nn.Module, path: str | Path, **kwargs) -> None:
    """``QuietStarModel.save_pretrained``'s work (see there): ``model``'s base into ``path``, then its extra
    tensors and settings."""
    from safetensors.torch import save_file

    from ..quant import int8_modules, pack_int8_tensors

    path = Path(path)
    if model.export_packing is not None:  # a BitNet base: its ternary layers packed (forgelib.quant)
        from ..quant import export_packed

        path.mkdir(parents=True, exist_ok=True)
        model.export_report = export_packed(model.base, path, model.export_packing)
    else:
        model.base.save_pretrained(path, safe_serialization=True, **kwargs)
    int8 = [f"mixing_head.{name}" for name in int8_modules(model.mixing_head)]
    extra = {"thought_embeddings": model.thought_embeddings.detach().contiguous()}
    extra.update({f"mixing_head.{k}": v.detach().contiguous() for k, v in model.mixing_head.state_dict().items()})
    if model.export_packing is not None and int8:
        extra = pack_int8_tensors(extra, int8)
    save_file(extra, str(path / EXTRA_FILE))
    (path / CONFIG_FILE).write_text(json.dumps({**model.wrapper_settings(),
                                                 **({"int8_modules": int8} if int8 else {})}, indent=2))
