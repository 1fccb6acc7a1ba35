"""An INT8 KV cache for ``model.generate`` that uses a record's static factors.

Keys and values are stored as int8 with the record's scale/offset (SPEC §3:
``q = clip(round(x / s) + o, -128, 127)``, ``x_hat = (q - o) * s``) and dequantized
on read::

    cache = StaticInt8KVCache.from_record("kv_cache.txt", model)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)
    cache.nbytes()                       # bytes held by the int8 K/V states

What the attention hands to ``cache.update`` is exactly what the record was calibrated
on: key states after RoPE (and any k-norm), ``[batch, kv_heads, seq, head_dim]``,
before GQA repetition. Per-channel factors index ``kv_heads * head_dim``, head-major.

Because the factors are static, each token is quantized once, when it enters the
cache, and never again; so the int8 tensors can live in the ordinary
``DynamicLayer``/``DynamicSlidingWindowLayer`` storage (concatenation, sliding-window
trimming, cropping and beam reordering all work on int8 unchanged). The tokens of the
current step are returned dequantized too, so every attention read sees INT8 K/V --
the same numbers as the fake-quant evaluation in :mod:`amct_hf.evaluate`.

This module also owns the model <-> record matching used by the evaluator:
:func:`kv_layout` (record keys, cache layer indices and channel counts, learnt with one
2-token forward through the calibration hooks) and :func:`check_record`.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from .calibrate import input_device
from .errors import RecordMismatchError

__all__ = [
    "StaticInt8KVCache", "StaticInt8Layer", "StaticInt8SlidingWindowLayer", "RecordMismatchError",
    "KVSlot", "kv_layout", "check_record", "quantize", "dequantize", "fake_quantize",
    "cache_nbytes",
]

QMIN, QMAX = -128, 127


# --------------------------------------------------------------------------- the convention

def quantize(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``clip(round(x / s) + o, -128, 127)`` as int8 (``x / s`` in float32, round half to even)."""
    return (torch.round(x.float() / scale) + offset).clamp_(QMIN, QMAX).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(q - o) * s`` in ``dtype``."""
    return ((q.float() - offset) * scale).to(dtype)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize, returned in ``x``'s dtype."""
    return dequantize(quantize(x, scale, offset), scale, offset, x.dtype)


def broadcast_factor(values: torch.Tensor, states: torch.Tensor, name: str = "layer") -> torch.Tensor:
    """Per-tensor (1 value) or per-channel (``kv_heads * head_dim`` values, head-major)
    factors shaped to broadcast against ``states[B, kv_heads, S, head_dim]``."""
    values = values.to(states.device)
    if values.numel() == 1:
        return values.reshape(())
    heads, dim = states.shape[1], states.shape[-1]
    if values.numel() != heads * dim:
        raise RecordMismatchError(
            f"layer {name!r}: the record has {values.numel()} factors, but the states have "
            f"{heads} kv heads x {dim} head_dim = {heads * dim} channels")
    return values.reshape(1, heads, 1, dim)


# --------------------------------------------------------------------------- model <-> record

@dataclass(frozen=True)
class KVSlot:
    """Where a record key lives in the model."""
    layer_idx: Optional[int]  # the cache layer the attention updates (None: no cache seen)
    channels: int             # kv_heads * head_dim


def _cache_kwarg(model: nn.Module) -> str:
    # transformers renamed the forward kwarg `past_key_values` -> `cache`; pass whichever
    # the forward declares, so no deprecation shim is involved
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def kv_layout(model: nn.Module) -> dict[str, KVSlot]:
    """Record key -> :class:`KVSlot` for every K/V state the model's attention computes,
    in execution order.

    Learnt by running 2 tokens through the calibration hooks (the same routing that
    names the record's layers) with a cache that logs its ``update`` calls: each
    attention calls ``cache.update(..., layer_idx)`` right before its attention function,
    so every observed key/value pair is tied to the layer index it is cached under.
    Works for any model the hooks support, whatever its module layout.
    """
    from .hooks import kv_calibration

    events: list = []

    class _LoggingCache(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            events.append(layer_idx)
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    layout: dict[str, KVSlot] = {}

    def observe(name: str, x: torch.Tensor) -> None:
        layer_idx = events[-1] if events else None
        layout.setdefault(name, KVSlot(layer_idx, int(x.shape[-1])))

    config = getattr(model, "config", None)
    try:
        cache = _LoggingCache(config=config)
    except Exception:  # a config DynamicCache cannot read: plain lazily-grown layers
        cache = _LoggingCache()
    ids = torch.zeros((1, 2), dtype=torch.long, device=input_device(model))
    with torch.no_grad(), kv_calibration(model, observe):
        model(input_ids=ids, use_cache=True, **{_cache_kwarg(model): cache})
    if not layout:
        raise RecordMismatchError(f"{type(model).__name__}: no key/value states were observed")
    return layout


def check_record(factors: Mapping[str, tuple[Sequence[float], Sequence[int]]],
                 layout: Mapping[str, KVSlot], where: str = "record") -> None:
    """Refuse a record that does not fit the model, naming the first mismatching layer
    (in the model's execution order): a model layer missing from the record, a factor
    count that is neither 1 (per-tensor) nor the layer's ``kv_heads * head_dim``
    (per-channel), scales/offsets of different lengths or non-positive scales; then a
    record layer the model does not have."""
    unknown = [name for name in factors if name not in layout]
    for name, slot in layout.items():
        if name not in factors:
            hint = f"; the record has {unknown[0]!r}, which the model does not have" if unknown else ""
            raise RecordMismatchError(
                f"{where} does not match the model: first mismatching layer {name!r} is not in "
                f"the record{hint}")
        scales, offsets = factors[name]
        n = len(scales)
        if n not in (1, slot.channels):
            raise RecordMismatchError(
                f"{where} does not match the model: first mismatching layer {name!r} has {n} "
                f"scales, but the model's layer has {slot.channels} channels (kv_heads * head_dim): "
                f"a per-channel record needs {slot.channels}, a per-tensor one 1")
        if len(offsets) != n:
            raise RecordMismatchError(
                f"{where}: layer {name!r} has {n} scales but {len(offsets)} offsets")
        bad = [s for s in scales if not (s > 0 and s < float("inf"))]
        if bad:
            raise RecordMismatchError(f"{where}: layer {name!r} has a non-positive or non-finite "
                                      f"scale {bad[0]!r}")
    if unknown:
        raise RecordMismatchError(
            f"{where} does not match the model: layer {unknown[0]!r} is in the record but the "
            f"model has no such layer (the model's layers are {next(iter(layout))!r} ...)")


def _read_factors(record) -> tuple[dict, str]:
    from .record import read_kv_factors
    if isinstance(record, Mapping):
        return dict(record), "the given factors"
    path = os.fspath(record)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"record file {path!r} does not exist")
    factors = read_kv_factors(path)
    if not factors:
        raise RecordMismatchError(f"record {path!r} holds no kv_cache_value entries")
    return factors, f"record {path!r}"


# --------------------------------------------------------------------------- the cache

def _as_tensor(values, dtype) -> torch.Tensor:
    return torch.as_tensor(list(values), dtype=dtype).reshape(-1)


class _Int8Storage:
    """Mixin over a ``DynamicLayer`` class: the parent stores int8, reads are dequantized."""

    is_croppable = True  # int8 tokens are cropped as they are: no requantization

    def _init_factors(self, key_factors, value_factors, names=("keys", "values")):
        (ks, ko), (vs, vo) = key_factors, value_factors
        # offsets are integers, kept in float32 so (q - o) * s is one fused float expression
        self._flat = [(_as_tensor(ks, torch.float32), _as_tensor(ko, torch.float32)),
                      (_as_tensor(vs, torch.float32), _as_tensor(vo, torch.float32))]
        self._names = names
        self._factors = None  # broadcast shapes, made on the first update (needs kv_heads)
        self.dtype = None

    def _shaped(self, key_states, value_states):
        if self._factors is None:
            self._factors = [(broadcast_factor(s, x, n), broadcast_factor(o, x, n))
                             for (s, o), x, n in zip(self._flat, (key_states, value_states), self._names)]
        return self._factors

    def lazy_initialization(self, key_states, value_states) -> None:
        # int8 storage even when called with model-dtype tensors (Cache.early_initialization)
        super().lazy_initialization(key_states[..., :0, :].to(torch.int8),
                                    value_states[..., :0, :].to(torch.int8))

    def update(self, key_states, value_states, *args, **kwargs):
        (ks, ko), (vs, vo) = self._shaped(key_states, value_states)
        self.dtype = key_states.dtype
        keys, values = super().update(quantize(key_states, ks, ko), quantize(value_states, vs, vo),
                                      *args, **kwargs)
        return dequantize(keys, ks, ko, self.dtype), dequantize(values, vs, vo, self.dtype)

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored keys and values, dequantized (model dtype)."""
        if not self.is_initialized or self._factors is None:
            raise RuntimeError("the cache layer holds nothing yet")
        (ks, ko), (vs, vo) = self._factors
        return (dequantize(self.keys, ks, ko, self.dtype), dequantize(self.values, vs, vo, self.dtype))

    def nbytes(self, factors: bool = False) -> int:
        """Bytes held by the int8 states (and, with ``factors``, by the scales/offsets: a
        fixed cost per layer, like weights, that does not grow with tokens or batch)."""
        held = 0
        if factors:
            held += sum(s.numel() * s.element_size() + o.numel() * o.element_size() for s, o in self._flat)
        if self.is_initialized and self.keys is not None:
            held += self.keys.numel() * self.keys.element_size()
            held += self.values.numel() * self.values.element_size()
        return held


class StaticInt8Layer(_Int8Storage, DynamicLayer):
    """A full-attention layer storing int8 K/V with static (record) factors."""

    def __init__(self, key_factors, value_factors, names=("keys", "values")):
        DynamicLayer.__init__(self)
        self._init_factors(key_factors, value_factors, names)


class StaticInt8SlidingWindowLayer(_Int8Storage, DynamicSlidingWindowLayer):
    """A sliding-window layer storing int8 K/V with static (record) factors."""

    def __init__(self, key_factors, value_factors, sliding_window: int, names=("keys", "values")):
        DynamicSlidingWindowLayer.__init__(self, sliding_window=sliding_window)
        self._init_factors(key_factors, value_factors, names)


def _layer_types(model: nn.Module, num_layers: int) -> list[tuple[str, dict]]:
    config = getattr(model, "config", None)
    if config is None:
        return [("full_attention", {})] * num_layers
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs
    except ImportError:  # older transformers: read layer_types / sliding_window directly
        text = config.get_text_config(decoder=True)
        types = getattr(text, "layer_types", None) or [
            "sliding_attention" if getattr(text, "sliding_window", None) else "full_attention"] * num_layers
        return [(t, {"sliding_window": text.sliding_window} if t != "full_attention" else {})
                for t in types]
    types, kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    return list(zip(types, kwargs))


class StaticInt8KVCache(Cache):
    """INT8 KV cache with static per-tensor or per-channel factors from an AMCT record.

    Build it with :meth:`from_record` (checks the record against the model). Use a
    fresh cache (or ``cache.reset()``) for every ``generate`` call.
    """

    def __init__(self, layers: list):
        super().__init__(layers=layers)

    @classmethod
    def from_record(cls, record, model: nn.Module) -> "StaticInt8KVCache":
        """A cache for ``model`` from a record file (or a ``{record key: (scales,
        offsets)}`` mapping). Refuses a record that does not match the model, naming the
        first mismatching layer."""
        factors, where = _read_factors(record)
        layout = kv_layout(model)
        check_record(factors, layout, where)
        # the hooks observe each attention's key then its value, right after its update
        by_idx: dict[int, list[str]] = {}
        for name, slot in layout.items():
            if slot.layer_idx is None:
                raise RecordMismatchError(
                    f"{type(model).__name__}: layer {name!r} does not use the KV cache")
            by_idx.setdefault(slot.layer_idx, []).append(name)
        num_layers = max(by_idx) + 1
        layers = []
        for idx, (layer_type, kwargs) in enumerate(_layer_types(model, num_layers)):
            pair = by_idx.get(idx, [])
            if len(pair) != 2:
                raise RecordMismatchError(
                    f"{type(model).__name__}: cache layer {idx} ({layer_type}) does not have one "
                    "key and one value state the hooks could see; StaticInt8KVCache cannot serve it")
            kf, vf = factors[pair[0]], factors[pair[1]]
            if layer_type == "full_attention":
                layers.append(StaticInt8Layer(kf, vf, pair))
            elif layer_type in ("sliding_attention", "chunked_attention"):
                layers.append(StaticInt8SlidingWindowLayer(kf, vf, kwargs["sliding_window"], pair))
            else:
                raise RecordMismatchError(
                    f"layer {idx} is of type {layer_type!r}; StaticInt8KVCache supports full and "
                    "sliding-window attention only")
        return cls(layers)

    def nbytes(self, factors: bool = False) -> int:
        """Bytes held by the int8 keys/values (plus the factors with ``factors=True``)."""
        return sum(layer.nbytes(factors) for layer in self.layers)


def cache_nbytes(cache: Cache, factors: bool = False) -> int:
    """Bytes held by any transformers ``Cache``'s key/value tensors: what the KV cache
    costs in memory at its current length. ``factors=True`` adds a
    :class:`StaticInt8KVCache`'s scales/offsets (a fixed per-layer cost)."""
    if isinstance(cache, StaticInt8KVCache):
        return cache.nbytes(factors)
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
