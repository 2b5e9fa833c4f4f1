"""Loading of causal LMs from local folders: Cognate, or any Hugging Face Llama/Qwen2/GPT-2 style model.

The architecture floor of the one way in (``forgelib.modelio.load_model``), which adds BitNet, Quiet-STaR and
artifact folders on top.
"""
from __future__ import annotations

from pathlib import Path

from transformers import AutoModelForCausalLM, PreTrainedModel

from ..params import short
from .configuration_cognate import CognateConfig
from .modeling_cognate import CognateForCausalLM
from .weights import ModelLoadError, check_folder_weights, read_json_file


def read_model_config(path, error: type[ValueError] = ModelLoadError) -> dict:
    """The ``config.json`` of a local model folder as a dict (clear errors for a missing folder or file, a file too
    large or not a JSON object; the folder's contents are never listed: it may be any folder of the machine)."""
    folder = Path(path)
    if not folder.is_dir():
        raise error(f"model folder {str(folder)!r} does not exist or is not a folder")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise error(f"{str(folder)!r} has no config.json: not a Hugging Face model folder")
    return read_json_file(config_file, error)


def _model_type(path, config: dict) -> str:
    found = config.get("model_type")
    if not isinstance(found, str):
        raise ModelLoadError(f"{str(path)!r}: config.json has no model_type (a name), so no architecture can be "
                             f"chosen (found {short(found)})")
    return found


def load_hf_causal_lm(path, **kwargs) -> PreTrainedModel:
    """A local Hugging Face causal-LM folder (Cognate or a Llama/Qwen2/GPT-2 style model) with
    ``AutoModelForCausalLM`` as its config describes it; keyword arguments go to ``from_pretrained`` (e.g. ``dtype``).
    A BitNet folder's ternary/int8 layers are not rebuilt here: ``forgelib.modelio.load_model`` (the one way in) does
    that."""
    found = _model_type(path, read_model_config(path))
    check_folder_weights(path)  # before anything is allocated: the config against the safetensors headers
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), **{**kwargs, "use_safetensors": True})
    except (KeyError, ValueError) as err:
        raise ModelLoadError(
            f"{str(path)!r} holds model_type {found!r}, which cannot be loaded as a causal LM here: {err}") from err


def load_cognate(path, **kwargs) -> CognateForCausalLM:
    """Load a Cognate model folder; refuses another architecture (naming what it found) and any checkpoint
    whose weights do not match the Cognate config exactly."""
    config = read_model_config(path)
    found = config.get("model_type")
    if found != CognateConfig.model_type:
        raise ModelLoadError(
            f"{str(path)!r} holds a {short(found)} model (architectures {short(config.get('architectures'))}), not a "
            "Cognate model; use forgelib.modelio.load_model(path) for other architectures, or cognate_from_llama for "
            "Llama weights")
    check_folder_weights(path)
    model, info = CognateForCausalLM.from_pretrained(str(path), output_loading_info=True, **kwargs)
    problems = {key: info.get(key) for key in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(key)}
    if problems:
        raise ModelLoadError(f"{str(path)!r}: the weights do not match the Cognate config: {problems}")
    return model


def cognate_from_llama(llama, **overrides) -> CognateForCausalLM:
    """A Cognate model carrying the weights of a ``LlamaForCausalLM`` (the model or its local folder).

    With no overrides (recursion, ACT and memory off) its logits equal the Llama model's. Overrides (e.g.
    ``n_cycles=2, use_act=True``) add Cognate features; their extra parameters start freshly initialised."""
    if not isinstance(llama, PreTrainedModel):
        llama = load_hf_causal_lm(llama)
    if llama.config.model_type != "llama":
        raise ModelLoadError(f"cognate_from_llama needs a llama model, got model_type {llama.config.model_type!r}")
    model = CognateForCausalLM(CognateConfig.from_llama(llama.config, **overrides))
    model.to(dtype=llama.dtype, device=llama.device)
    fresh = {name for name in model.state_dict() if ".memory." in name or name.startswith("model.halt_head.")}
    missing, unexpected = model.load_state_dict(llama.state_dict(), strict=False)
    if unexpected or set(missing) - fresh:
        raise ModelLoadError(f"Llama weights do not fit: missing {sorted(set(missing) - fresh)}, "
                             f"unexpected {sorted(unexpected)}")
    return model.train(llama.training)


__all__ = ["ModelLoadError", "load_hf_causal_lm", "load_cognate", "cognate_from_llama", "read_model_config"]
