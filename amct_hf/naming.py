"""Record keys: how a model's K/V states are named in a record, and how to read a name.

A record key is the module path of the projection that produces the state,
``<attention module>.k_proj`` / ``.v_proj`` (what AMCT and the Ascend engines use). An
attention module without ``k_proj``/``v_proj`` children (fused ``qkv_proj``, latent
attention) gets ``<attention module>.key_states`` / ``.value_states``. Every module that
builds or reads record keys (hooks, driver, exports, evaluation, report) goes through here.
"""
from __future__ import annotations

import re

__all__ = ["KEY_SUFFIXES", "VALUE_SUFFIXES", "kv_record_keys", "layer_kind", "layer_index",
           "attention_path", "record_order"]

KEY_SUFFIXES = ("k_proj", "key_states")
VALUE_SUFFIXES = ("v_proj", "value_states")
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def kv_record_keys(attention_path: str, has_kv_projections: bool) -> tuple[str, str]:
    """The (key, value) record keys of the attention module at ``attention_path``."""
    if has_kv_projections:
        return f"{attention_path}.k_proj", f"{attention_path}.v_proj"
    return f"{attention_path}.key_states", f"{attention_path}.value_states"


def layer_kind(name: str) -> str | None:
    """``"key"`` / ``"value"`` for a record key, None for a name that is neither."""
    last = name.rpartition(".")[2]
    if last in KEY_SUFFIXES:
        return "key"
    if last in VALUE_SUFFIXES:
        return "value"
    return None


def layer_index(name: str) -> int | None:
    """Decoder layer number from ``...layers.{i}....``, or None when the name has none."""
    m = _LAYER_INDEX.search(name)
    return int(m.group(1)) if m else None


def attention_path(name: str) -> str:
    """The attention module a record key belongs to."""
    return name.rpartition(".")[0]


def _sort_key(name: str):
    parts = name.split(".")
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts]


def record_order(names) -> list[str]:
    """Names in model order: ``layers.10`` after ``layers.9``, keys before values."""
    return sorted(names, key=_sort_key)
