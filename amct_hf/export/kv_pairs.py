"""A record's KV factors, checked against a model and arranged per attention module.

Shared by the deployable exports: every engine wants, per decoder layer, one key and one
value factor set named after the attention module, so record keys are mapped here:
``<attn>.k_proj`` / ``<attn>.key_states`` -> (``<attn>``, key), ``<attn>.v_proj`` /
``<attn>.value_states`` -> (``<attn>``, value). The fused-attention names map to the
same ``<attn>.k_proj`` / ``<attn>.v_proj`` tensor prefixes msModelSlim gives its KV
tensors for models with a fused ``qkv_proj`` (vllm-ascend's Qwen2 C8 method loads
``k_proj.kv_cache_scale`` / ``v_proj.kv_cache_scale`` for such models too).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import ExportError, RecordMismatchError
from ..naming import attention_path, layer_kind
from ..record.files import load_kv_factors

__all__ = ["KVPair", "kv_pairs", "load_model_record", "record_channel_factors"]


@dataclass
class KVPair:
    """One attention module's key and value factors (record values, one per channel)."""
    attention: str                       # module path, e.g. model.layers.0.self_attn
    layer_idx: int | None                # cache layer index (execution order)
    key: tuple[list[float], list[int]]   # (scales, offsets)
    value: tuple[list[float], list[int]]
    key_record_name: str
    value_record_name: str


def _split(name: str) -> tuple[str, str]:
    kind = layer_kind(name)
    if kind is None:
        raise RecordMismatchError(f"record layer {name!r} is neither a key (k_proj/key_states) "
                                  f"nor a value (v_proj/value_states) entry")
    return attention_path(name), kind


def load_model_record(record_file: str | os.PathLike, source) -> dict:
    """The record's factors, refused unless they fit ``source``'s model exactly
    (:func:`amct_hf.modeling.layout.check_record`: first mismatching layer named)."""
    from ..modeling.layout import check_record
    from .checks import check_kv_geometry

    check_kv_geometry(source)  # a config the weights contradict is not the record's fault
    factors, where = load_kv_factors(os.fspath(record_file))
    check_record(factors, source.kv_layout, where=where)
    return factors


def record_channel_factors(factors: dict, source) -> dict:
    """Record key -> (scales, offsets) broadcast to the layer's ``kv_heads * head_dim``
    channels (a per-tensor entry repeated), in the model's execution order; zero-range
    placeholder channels get neutral factors (:mod:`amct_hf.export.checks`)."""
    from .checks import neutral_channel_factors

    out = {}
    for name, slot in source.kv_layout.items():
        scales, offsets = factors[name]
        if len(scales) == 1:
            scales, offsets = scales * slot.channels, offsets * slot.channels
        out[name] = neutral_channel_factors(scales, offsets)
    return out


def kv_pairs(factors: dict, source) -> list[KVPair]:
    """One :class:`KVPair` per attention module, in execution order; also checks that the
    checkpoint's tensor names follow the model's module names (else the added tensors would
    sit beside nothing an engine recognises)."""
    pairs: dict[str, dict] = {}
    for name, slot in source.kv_layout.items():
        attn, kind = _split(name)
        entry = pairs.setdefault(attn, {"layer_idx": slot.layer_idx})
        entry[kind] = (name, factors[name])
    names = [t.name for t in source.tensors]
    out = []
    for attn, entry in pairs.items():
        if "key" not in entry or "value" not in entry:
            missing = "value" if "key" in entry else "key"
            raise RecordMismatchError(f"attention {attn!r} has no {missing} entry in the model's layout")
        if not any(n.startswith(attn + ".") for n in names):
            raise ExportError(f"{source.model_dir}: no tensor is named under {attn + '.'!r}; the "
                              f"checkpoint's tensor names do not follow the model's module names")
        (k_name, k), (v_name, v) = entry["key"], entry["value"]
        out.append(KVPair(attn, entry["layer_idx"], k, v, k_name, v_name))
    return out
