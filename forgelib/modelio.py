"""The one way in and out for model folders: ``load_model(path)`` / ``save_model(model, path)``.

Every model a phase hands on is one of the first four kinds (``model_kind``), a real pretrained model may come as the
fifth, and this module is the only place that tells them apart:

* ``"hf"``: a plain Hugging Face causal-LM folder (Cognate, Llama, Qwen2, GPT-2 style; ``forgelib.models``),
  a fake-quantized BitNet model among them (a ``bitnet`` entry in config.json: its Linear layers come back as
  BitLinear, its embeddings as int8 ones when the entry says so; ``forgelib.quant``);
* ``"packed"``: a packed ternary folder written by ``forgelib.quant.export_packed`` (``bitnet.packing`` other than
  ``none``): packed inference layers, or BitLinear layers on exact latent weights with ``trainable=True``;
* ``"quietstar"``: a causal LM of one of the kinds above plus ``quietstar.json`` / ``quietstar.safetensors``
  (``forgelib.quietstar.QuietStarModel``);
* ``"artifact"``: a Phase-8 compressed artifact (``model.forge``, ``forgelib.quant.artifact``), holding a causal LM
  or a Quiet-STaR model;
* ``"gguf"``: one GGUF file (llama.cpp's format; a ``.gguf`` name or the GGUF magic), read through transformers with
  its weights dequantized (``forgelib.models.gguf_file``; ``forgelib.models.real`` names the shipped real models).
  It is read, never written: ``save_model`` writes the loaded model as a plain folder.

``load_tokenizer_for(path)`` gives the tokenizer that goes with any of them (a GGUF file's own, the folder's).

Layering: ``models`` (architectures), ``quant`` (ternary/int8 layers, packing, codecs, the artifact container) and
``quietstar`` (the Quiet-STaR wrapper) never import this module or each other upward; this module sits above the
three and joins them.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from pathlib import Path
from typing import Any

from torch import nn

from .models.gguf_file import is_gguf_path, load_gguf_causal_lm, load_gguf_tokenizer
from .models.loading import ModelLoadError, load_hf_causal_lm, read_model_config
from .models.weights import read_json_file, safetensors_header
from .params import cut, short
from .quietstar import CONFIG_FILE, EXTRA_FILE, QuietStarConfig, QuietStarModel, base_lm, is_quietstar

ARTIFACT_FILE = "model.forge"
KINDS = ("hf", "packed", "quietstar", "artifact", "gguf")

__all__ = ["ARTIFACT_FILE", "KINDS", "ModelLoadError", "base_lm", "is_quietstar", "load_causal_lm",
           "load_compressed", "load_lm", "load_model", "load_quietstar", "load_tokenizer_for", "model_kind",
           "quiet_loading", "save_model"]


_LOADING = threading.RLock()
"""Held while a model loads. transformers' loading keeps global state (the meta-device construction, weight tying, its
logging switches): two threads loading at once (``forgelib.jobs`` runs jobs side by side; the scorecard loads the
chain's models that way) got untied LM heads and ModelLoadErrors ('lm_head.weight ... not stored') for a tied Cognate
folder, 6 loads of 8 wrong. Loading is a small share of a job's time; the jobs still compute side by side."""


def _one_at_a_time(load):
    """``load`` run under :data:`_LOADING`: one model loads at a time in this process."""
    @functools.wraps(load)
    def locked(*args, **kwargs):
        with _LOADING:
            return load(*args, **kwargs)
    return locked


@contextlib.contextmanager
def quiet_loading(progress: bool = False):
    """transformers' "Loading weights" bar off while a model loads (one line per tiny checkpoint is noise in
    notebooks and logs; ``progress=True`` keeps it); the bar's previous setting comes back afterwards."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def model_kind(path: str | Path) -> str:
    """Which of ``KINDS`` the folder (or ``.forge`` / ``.gguf`` file) at ``path`` holds (ModelLoadError naming what
    was found when it is none of them)."""
    path = Path(path)
    if is_gguf_path(path):
        return "gguf"
    if path.is_file() and path.suffix == ".forge" or (path / ARTIFACT_FILE).is_file():
        return "artifact"
    if is_quietstar(path):
        return "quietstar"
    bitnet = read_model_config(path).get("bitnet")
    return "packed" if isinstance(bitnet, dict) and bitnet.get("packing", "none") != "none" else "hf"


@_one_at_a_time
def load_model(path: str | Path, trainable: bool = False, tokenizer: Any = None, **kwargs) -> nn.Module:
    """Any model folder a phase hands on (``model_kind``), in eval mode: an artifact through ``load_compressed``, a
    Quiet-STaR folder as ``QuietStarModel`` (``load_quietstar``), a GGUF file as the transformers model it holds
    (dequantized; ``forgelib.models.gguf_file``), any other causal LM through ``load_causal_lm`` (``trainable``:
    BitLinear layers on latent weights for a packed one). ``tokenizer``: the Quiet-STaR wrapper's (default: the
    folder's); ``kwargs`` go to ``from_pretrained`` of a plain folder or a GGUF file (e.g. ``dtype``)."""
    kind = model_kind(path)
    if kind == "gguf":
        progress = kwargs.pop("progress", False)  # transformers' loading and dequantizing bars
        with quiet_loading(progress):
            return load_gguf_causal_lm(path, progress=progress, **kwargs).eval()
    if kind == "artifact":
        file = Path(path) if Path(path).is_file() else Path(path) / ARTIFACT_FILE
        return load_compressed(file, tokenizer=tokenizer)
    if kind == "quietstar":
        return load_quietstar(path, tokenizer=tokenizer, trainable=trainable)
    return load_causal_lm(path, trainable=trainable, **kwargs).eval()


load_lm = load_model
"""The name the phases, notebooks and benchmarks have used for ``load_model``."""


@_one_at_a_time
def load_causal_lm(path: str | Path, trainable: bool = False, progress: bool = False, **kwargs) -> nn.Module:
    """A local causal-LM folder (kind ``hf`` or ``packed``) as it was saved: a packed folder through
    ``forgelib.quant.load_packed`` (packed inference layers; ``trainable=True``: BitLinear layers to train on), a
    fake-quantized one with its Linear layers converted back to BitLinear (and its embeddings to int8 ones when the
    config's ``bitnet`` entry says ``embedding_bits: 8``), any other with ``AutoModelForCausalLM``. ``kwargs`` go to
    ``from_pretrained`` (a packed folder takes ``dtype`` only); ``progress``: show transformers' loading bar."""
    from .quant import convert_to_bitnet, load_packed

    bitnet = read_model_config(path).get("bitnet")
    if isinstance(bitnet, dict) and bitnet.get("packing", "none") != "none":
        return load_packed(path, trainable=trainable, **({"dtype": kwargs["dtype"]} if "dtype" in kwargs else {}))
    with quiet_loading(progress):
        model = load_hf_causal_lm(path, **kwargs)
    if isinstance(bitnet, dict):
        convert_to_bitnet(model, include=bitnet.get("include"),
                          quantize_activations=bitnet.get("activation_bits") is not None,
                          embedding_bits=bitnet.get("embedding_bits"), int8_include=bitnet.get("int8_include"),
                          int4_include=bitnet.get("int4_include"))
    return model


@_one_at_a_time
def load_quietstar(path: str | Path, tokenizer: Any = None, trainable: bool = False,
                   **config_overrides) -> QuietStarModel:
    """Rebuild a QuietStarModel saved by its ``save_pretrained`` (the tokenizer from the folder unless given). A
    packed BitNet base loads with packed inference layers, or as BitLinear layers with ``trainable=True``; int8 layers
    of the mixing head come back as Int8Linear on latent weights that compute exactly the stored int8 values."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from .quant import convert_to_int8, unpack_int8_tensors

    path = Path(path)
    if not is_quietstar(path):
        raise FileNotFoundError(f"{path} is not a Quiet-STaR model folder (needs {CONFIG_FILE} and {EXTRA_FILE})")
    meta = read_json_file(path / CONFIG_FILE)
    header, _ = safetensors_header(path / EXTRA_FILE)  # checked against the file before anything is read
    stored = {name.removesuffix("_int8"): tuple(info["shape"]) for name, info in header.items()}
    settings = meta.get("config")
    settings = {**settings, **config_overrides} if isinstance(settings, dict) else settings
    config = quietstar_config(settings, stored, str(path / CONFIG_FILE))
    int8 = meta.get("int8_modules", [])
    if not isinstance(int8, list) or not all(isinstance(n, str) and n.startswith("mixing_head.") for n in int8):
        raise ModelLoadError(f"{path / CONFIG_FILE}: int8_modules {short(int8)} must name layers of the mixing head")
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
    model = QuietStarModel(load_causal_lm(path, trainable=trainable), tokenizer, config)
    if (model.sot_id, model.eot_id) != (meta.get("sot_id"), meta.get("eot_id")):
        raise ModelLoadError(f"{path}: the tokenizer's thought token ids {(model.sot_id, model.eot_id)} differ from "
                             f"the saved ones {(short(meta.get('sot_id')), short(meta.get('eot_id')))}")
    model.thinking = stored_thinking(meta, str(path / CONFIG_FILE))
    convert_to_int8(model.mixing_head, [name.removeprefix("mixing_head.") for name in int8])
    extra = unpack_int8_tensors(load_file(str(path / EXTRA_FILE)), where=str(path / EXTRA_FILE))
    want = {"thought_embeddings", *(f"mixing_head.{k}" for k in model.mixing_head.state_dict())}
    if set(extra) != want:
        raise ModelLoadError(f"{path / EXTRA_FILE}: expected tensors {sorted(want)}, found "
                             f"{[short(n) for n in sorted(extra)[:10]]}")
    try:
        with torch.no_grad():
            model.thought_embeddings.copy_(extra.pop("thought_embeddings"))
        model.mixing_head.load_state_dict({k.removeprefix("mixing_head."): v for k, v in extra.items()})
    except RuntimeError as exc:  # a shape that differs from the model's
        raise ModelLoadError(f"{path / EXTRA_FILE}: the tensors do not fit the model ({cut(str(exc), 200)})") from None
    return model.eval()


def quietstar_config(settings: Any, stored: dict, where: str,
                     error: type[ValueError] = ModelLoadError) -> QuietStarConfig:
    """The QuietStarConfig of stored ``settings``, checked before the wrapper is built: known keys and valid values
    (QuietStarConfig's own checks), and ``mixing_hidden`` equal to the stored mixing head's width (``stored``:
    {tensor: shape} of the wrapper's own tensors), so a hostile width allocates nothing."""
    if not isinstance(settings, dict):
        raise error(f"{where}: the Quiet-STaR settings are not a table (got {short(settings)})")
    try:
        config = QuietStarConfig(**settings)
    except (TypeError, ValueError) as exc:
        raise error(f"{where}: invalid Quiet-STaR settings ({cut(str(exc), 200)})") from None
    head = stored.get("mixing_head.0.weight")
    if head is None or tuple(head)[:1] != (config.mixing_hidden,):
        raise error(f"{where}: mixing_hidden {short(config.mixing_hidden)} does not match the stored mixing head "
                    f"(mixing_head.0.weight {list(head) if head is not None else 'missing'})")
    return config


def stored_thinking(settings: dict, where: str, error: type[ValueError] = ModelLoadError) -> bool:
    """Whether a stored Quiet-STaR model answers thinking: its ``thinking`` (true when absent: folders written
    before Phase 3 decided it thought always), a boolean."""
    thinking = settings.get("thinking", True)
    if not isinstance(thinking, bool):
        raise error(f"{where}: 'thinking' must be true or false, got {short(thinking)}")
    return thinking


@_one_at_a_time
def load_compressed(path: str | Path, tokenizer: Any = None) -> nn.Module:
    """The model a Phase-8 artifact file holds (``forgelib.quant.artifact.read_artifact``), eval mode: a
    QuietStarModel when it was one (its tokenizer: ``tokenizer`` or the one beside the file)."""
    from .quant.artifact import ArtifactError, read_artifact

    def wrap(base: nn.Module, settings: dict, stored: dict) -> QuietStarModel:
        from transformers import AutoTokenizer

        config = quietstar_config(settings.get("config"), stored, str(path), ArtifactError)
        try:
            model = QuietStarModel(base, tokenizer or AutoTokenizer.from_pretrained(Path(path).parent), config)
        except (ValueError, OSError) as exc:  # no thought tokens in the tokenizer, no tokenizer beside the file
            raise ArtifactError(f"{path}: the Quiet-STaR model cannot be rebuilt ({cut(str(exc), 200)})") from None
        if (model.sot_id, model.eot_id) != (settings.get("sot_id"), settings.get("eot_id")):
            raise ArtifactError(f"{path}: the tokenizer's thought token ids differ from the artifact's")
        model.thinking = stored_thinking(settings, str(path), ArtifactError)
        return model

    return read_artifact(path, wrap=wrap).eval()


@_one_at_a_time
def load_tokenizer_for(path: str | Path) -> Any:
    """The tokenizer that goes with the model source ``path`` (any of ``KINDS``): a GGUF file's own (built from its
    metadata, with its chat template), the one saved beside a ``.forge`` file, else the folder's
    (``AutoTokenizer``). Agent Forge's special tokens are not required: ``forgelib.data.tokenizer.load_tokenizer``
    checks those for the phases' own tokenizers."""
    from transformers import AutoTokenizer

    path = Path(path)
    if is_gguf_path(path):
        return load_gguf_tokenizer(path)
    folder = path.parent if path.is_file() and path.suffix == ".forge" else path
    if not folder.is_dir():
        raise ModelLoadError(f"model source {cut(str(path), 200)!r} does not exist (a model folder, a .forge or a "
                             ".gguf file)")
    return AutoTokenizer.from_pretrained(str(folder))


def save_model(model: nn.Module, path: str | Path, tokenizer: Any = None, packing: str | None = None,
               plan: dict | None = None, **kwargs) -> dict:
    """Write ``model`` to the folder ``path`` in the kind it will be read back as by ``load_model``: with ``plan`` a
    Phase-8 artifact (``forgelib.quant.artifact.save_compressed``, ``kwargs`` its hessians/extras); with ``packing``
    ('2bit' / 'base3') a BitNet model's packed folder (``forgelib.quant.export_packed``; a QuietStarModel packs its
    base); else the model's own ``save_pretrained`` (a Quiet-STaR folder for a QuietStarModel). The tokenizer, when
    given, is saved beside it. Returns the byte report of a packed folder or an artifact, else {}."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if plan is not None:
        from .quant.artifact import save_compressed

        return save_compressed(model, path / ARTIFACT_FILE, plan, tokenizer=tokenizer, **kwargs)
    if packing is not None and not isinstance(model, QuietStarModel):
        from .quant import export_packed

        report = export_packed(model, path, packing)
    else:
        if packing is not None:
            model.export_packing = packing
        model.save_pretrained(path, **kwargs)
        report = getattr(model, "export_report", None) or {}
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return report
