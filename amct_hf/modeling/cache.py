"""An INT8 KV cache for ``model.generate`` that uses a record's static factors.

Keys and values are stored as int8 with the record's scale/offset (SPEC §3:
``q = clip(round(x / s) + o, -128, 127)``, ``x_hat = (q - o) * s``) and dequantized
on read::

    cache = StaticInt8KVCache.from_record("kv_cache.txt", model)
    out = model.generate(**inputs, cache=cache, max_new_tokens=64)
    cache.nbytes()                       # bytes held by the int8 K/V states

What the attention hands to ``cache.update`` is exactly what the record was calibrated
on: key states after RoPE (and any k-norm), ``[batch, kv_heads, seq, head_dim]``,
before GQA repetition. Per-channel factors index ``kv_heads * head_dim``, head-major.

Because the factors are static, each token is quantized once, when it enters the
cache, and never again; so the int8 tensors can live in the ordinary
``DynamicLayer``/``DynamicSlidingWindowLayer`` storage (concatenation, sliding-window
trimming, cropping and beam reordering all work on int8 unchanged). The tokens of the
current step are returned dequantized too, so every attention read sees INT8 K/V --
the same numbers as the fake-quant evaluation in :mod:`amct_hf.evaluation.perplexity`.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from ..algorithms.convention import dequantize, quantize
from ..errors import RecordMismatchError
from ..record.files import load_kv_factors
from .layout import broadcast_factor, check_record, kv_layout

__all__ = ["StaticInt8KVCache", "StaticInt8Layer", "StaticInt8SlidingWindowLayer", "cache_nbytes"]


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
    def from_record(cls, record, model: nn.Module) -> StaticInt8KVCache:
        """A cache for ``model`` from a record file (or a ``{record key: (scales,
        offsets)}`` mapping). Refuses a record that does not match the model, naming the
        first mismatching layer."""
        factors, where = load_kv_factors(record)
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
