"""The codec registry: every codec of a compressed artifact (``forgelib.quant.artifact``) by name, with its settings'
defaults and its encode / decode.

A codec is registered with ``register_codec(name, defaults)`` on a class holding two static methods::

    @register_codec("rtn", {"bits": 4, "group": 32})
    class _RTN:
        @staticmethod
        def encode(tensor, settings, hessian):  # -> (parts: {name: tensor}, metadata: dict)
            ...
        @staticmethod
        def decode(parts, meta, shape):  # -> the tensor, of ``shape``
            ...

``encode`` gets the tensor as float32 on the CPU, ``settings`` = the defaults updated by the spec (every key of
the defaults present), and ``hessian`` (the input second moments of the layer the tensor feeds, or None). The parts
are written to the file in the order given, so their bytes are exactly what the codec stores; the metadata is
written beside the artifact's own ``codec`` and ``shape`` and handed back to ``decode``. The defaults are the ONE
table of the codec's settings: a spec may name only their keys, and the codec's standalone quantize function takes
the same values as its defaults.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch

Parts = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Codec:
    """A registered codec: its name, the defaults of its settings (read-only), and its encode / decode."""

    name: str
    defaults: Mapping[str, Any]
    encode: Callable[[torch.Tensor, dict, torch.Tensor | None], tuple[Parts, dict]]
    decode: Callable[[Parts, dict, tuple[int, ...]], torch.Tensor]

    def unknown_settings(self, spec: Mapping) -> list[str]:
        """The keys of ``spec`` (besides ``codec``) that are not settings of this codec, sorted."""
        return sorted(set(spec) - set(self.defaults) - {"codec"})

    def settings(self, spec: Mapping) -> dict:
        """The defaults updated by the settings ``spec`` names (``codec`` left out)."""
        return {**self.defaults, **{k: v for k, v in spec.items() if k != "codec"}}


CODECS: dict[str, Codec] = {}
"""Every registered codec by name, in registration order."""


def register_codec(name: str, defaults: Mapping[str, Any]):
    """Decorator: register the class's static ``encode`` / ``decode`` as codec ``name`` with ``defaults`` (module
    docstring)."""

    def wrap(cls):
        if name in CODECS:
            raise ValueError(f"codec {name!r} is registered twice")
        CODECS[name] = Codec(name, MappingProxyType(dict(defaults)), cls.encode, cls.decode)
        return cls

    return wrap


def get_codec(name: str) -> Codec:
    """The registered codec called ``name``; an unknown name fails with the list of valid ones."""
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; valid: {', '.join(CODECS)}") from None


def codec_defaults(name: str | None = None) -> dict:
    """The defaults of codec ``name`` (a copy), or the whole table {codec: defaults} when no name is given."""
    if name is None:
        return {n: dict(c.defaults) for n, c in CODECS.items()}
    return dict(get_codec(name).defaults)


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a matrix: (first dimension, the rest flattened); a vector as one row."""
    return t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)
