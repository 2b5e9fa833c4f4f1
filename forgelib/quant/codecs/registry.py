"""The codec registry: every codec of a compressed artifact (``forgelib.quant.artifact``) by name, with its settings'
defaults and ranges and its encode / check / decode.

A codec is registered with ``register_codec(name, defaults, limits)`` on a class holding three static methods::

    @register_codec("rtn", {"bits": 4, "group": 32}, {"bits": range(2, 9), "group": range(1, 4097)})
    class _RTN:
        @staticmethod
        def encode(tensor, settings, hessian):  # -> (parts: {name: tensor}, metadata: dict)
            ...
        @staticmethod
        def check(parts, meta, shape):  # ValueError unless the metadata and the parts' sizes fit each other
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

An artifact is read as hostile input: ``limits`` gives every integer setting its range (a ``range``) or its
choices (a tuple), checked when a spec is written (``check_settings``) and again on the settings an artifact's
metadata carries (they are the same keys); ``check`` then verifies, by arithmetic alone, that the metadata's
counts and the parts' dtypes and sizes fit the entry's shape, so ``decode`` never allocates more than the shape
and the stored parts imply. ``need_part``, ``meta_int`` and ``meta_shape`` are the helpers of those checks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch

from ...params import short

Parts = dict[str, torch.Tensor]
Limit = range | tuple


@dataclass(frozen=True)
class Codec:
    """A registered codec: its name, the defaults of its settings (read-only), and its encode / decode."""

    name: str
    defaults: Mapping[str, Any]
    encode: Callable[[torch.Tensor, dict, torch.Tensor | None], tuple[Parts, dict]]
    decode: Callable[[Parts, dict, tuple[int, ...]], torch.Tensor]
    check: Callable[[Parts, dict, tuple[int, ...]], None]
    limits: Mapping[str, Limit]

    def unknown_settings(self, spec: Mapping) -> list[str]:
        """The keys of ``spec`` (besides ``codec``) that are not settings of this codec, sorted."""
        return sorted(set(spec) - set(self.defaults) - {"codec"})

    def settings(self, spec: Mapping) -> dict:
        """The defaults updated by the settings ``spec`` names (``codec`` left out)."""
        return {**self.defaults, **{k: v for k, v in spec.items() if k != "codec"}}

    def check_settings(self, settings: Mapping) -> None:
        """ValueError naming the first integer setting of ``settings`` outside its range or choices (``limits``)."""
        for key, limit in self.limits.items():
            value = settings.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value not in limit:
                allowed = (f"an integer from {limit.start} to {limit.stop - 1}" if isinstance(limit, range)
                           else f"one of {', '.join(map(str, limit))}")
                raise ValueError(f"codec {self.name!r}: {key} must be {allowed}, got {short(value)}")


CODECS: dict[str, Codec] = {}
"""Every registered codec by name, in registration order."""


def register_codec(name: str, defaults: Mapping[str, Any], limits: Mapping[str, Limit] | None = None):
    """Decorator: register the class's static ``encode`` / ``check`` / ``decode`` as codec ``name`` with
    ``defaults`` and the ``limits`` of its integer settings (module docstring); every integer default needs one."""

    def wrap(cls):
        if name in CODECS:
            raise ValueError(f"codec {name!r} is registered twice")
        unbounded = sorted(k for k, v in defaults.items() if isinstance(v, int) and not isinstance(v, bool)
                           and k not in (limits or {}))
        if unbounded or not callable(getattr(cls, "check", None)):
            raise ValueError(f"codec {name!r} needs a static check(parts, meta, shape) and limits for {unbounded}")
        CODECS[name] = Codec(name, MappingProxyType(dict(defaults)), cls.encode, cls.decode, cls.check,
                             MappingProxyType(dict(limits or {})))
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


def need_part(parts: Parts, key: str, dtype: torch.dtype, numel: int | None = None,
              shape: tuple | list | None = None) -> torch.Tensor:
    """Part ``key`` of an entry, its dtype and its number of values or shape checked (ValueError saying what
    differs)."""
    part = parts.get(key)
    if part is None:
        raise ValueError(f"part {key!r} is missing")
    if part.dtype != dtype:
        raise ValueError(f"part {key!r} is {str(part.dtype).removeprefix('torch.')}, not "
                         f"{str(dtype).removeprefix('torch.')}")
    if numel is not None and part.numel() != numel:
        raise ValueError(f"part {key!r} holds {part.numel()} values where the metadata implies {numel}")
    if shape is not None and tuple(part.shape) != tuple(shape):
        raise ValueError(f"part {key!r} has shape {list(part.shape)} where the metadata implies {list(shape)}")
    return part


def meta_int(meta: Mapping, key: str, below: int | None = None) -> int:
    """The metadata's integer ``key``, >= 0 (and < ``below`` when given), else ValueError naming it."""
    value = meta.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or (below is not None and value >= below):
        bound = f" below {below}" if below is not None else ""
        raise ValueError(f"metadata {key} must be an integer >= 0{bound}, got {short(value)}")
    return value


def meta_shape(meta: Mapping, key: str, shape: tuple[int, ...], rank: int = 2) -> tuple[int, ...]:
    """The metadata's ``key``: ``rank`` integers >= 0 whose product is the entry's number of values (ValueError
    otherwise)."""
    value = meta.get(key)
    if not isinstance(value, list) or len(value) != rank or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value):
        raise ValueError(f"metadata {key} must be {rank} integers >= 0, got {short(value)}")
    if math.prod(value) != math.prod(shape):
        raise ValueError(f"metadata {key} {value} does not hold the {math.prod(shape)} values of shape {list(shape)}")
    return tuple(value)


def meta_groups(meta: Mapping, shape: tuple[int, ...], group: int, key: str, what: str) -> tuple[int, int]:
    """The metadata's ``matrix`` (rows, cols) of an entry cut into ``what`` of ``group`` values along its rows, its
    count ``key`` checked to be exactly those (ValueError naming the count otherwise)."""
    rows, cols = meta_shape(meta, "matrix", shape)
    if cols % group or meta_int(meta, key) != rows * cols // group:
        raise ValueError(f"metadata {key} {meta.get(key)} must be the {rows * cols / group:g} {what} of {group} of a "
                         f"{rows} x {cols} matrix")
    return rows, cols


def packed_size(count: int, width: int) -> int:
    """Bytes of ``count`` integers of ``width`` bits packed by ``pack_bits``."""
    return math.ceil(count * width / 8)


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a matrix: (first dimension, the rest flattened); a vector as one row."""
    return t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)
