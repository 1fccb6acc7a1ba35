"""Model <-> record: which record keys a model computes, where each lives in its KV
cache, and whether a record fits the model."""
from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from ..errors import RecordFileError, RecordMismatchError
from ..naming import layer_kind
from ..record.files import uneditable_keys
from .loading import input_device

__all__ = ["KVSlot", "kv_layout", "check_record", "check_record_editable", "broadcast_factor", "cache_kwarg"]


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


@dataclass(frozen=True)
class KVSlot:
    """Where a record key lives in the model."""
    layer_idx: int | None  # the cache layer the attention updates (None: no cache seen)
    channels: int             # kv_heads * head_dim


def cache_kwarg(model: nn.Module) -> str:
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
    from .attention import kv_calibration

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
        model(input_ids=ids, use_cache=True, **{cache_kwarg(model): cache})
    if not layout:
        raise RecordMismatchError(f"{type(model).__name__}: no key/value states were observed")
    return layout


def check_record(factors: Mapping[str, tuple[Sequence[float], Sequence[int]]],
                 layout: Mapping[str, KVSlot], where: str = "record") -> None:
    """Refuse a record that does not fit the model, naming the first mismatching layer
    (in the model's execution order): a model layer missing from the record, a factor
    count that is neither 1 (per-tensor) nor the layer's ``kv_heads * head_dim``
    (per-channel); then a record layer the model does not have. The factors themselves
    are checked where they are read (:func:`amct_hf.record.files.load_kv_factors`)."""
    unknown = [name for name in factors if name not in layout]
    for name, slot in layout.items():
        if name not in factors:
            hint = f"; the record has {unknown[0]!r}, which the model does not have" if unknown else ""
            raise RecordMismatchError(
                f"{where} does not match the model: first mismatching layer {name!r} is not in "
                f"the record{hint}")
        n = len(factors[name][0])
        if n not in (1, slot.channels):
            raise RecordMismatchError(
                f"{where} does not match the model: first mismatching layer {name!r} has {n} "
                f"scales, but the model's layer has {slot.channels} channels (kv_heads * head_dim): "
                f"a per-channel record needs {slot.channels}, a per-tensor one 1")
    if unknown:
        raise RecordMismatchError(
            f"{where} does not match the model: layer {unknown[0]!r} is in the record but the "
            f"model has no such layer (the model's layers are {next(iter(layout))!r} ...)"
            f"{_other_model_hint(unknown, layout)}")


def _other_model_hint(unknown, layout) -> str:
    # calibrate merges into an existing record on purpose (one record, several models);
    # every consumer needs one model's entries, so say how to get there
    return (f"; {len(unknown)} record entr{'ies' if len(unknown) != 1 else 'y'} belong to no layer of this "
            f"model (a record calibrate merged several models into?): calibrate this model into its own "
            f"--record file, or copy its entries into a new record")


def _model_keys(model) -> set[str]:
    """Every record key the model's modules can give (a superset: ``k_proj`` / ``v_proj``
    modules, and the fused-attention names of every module)."""
    names = [name for name, _ in model.named_modules() if name]
    keys = {n for n in names if layer_kind(n) is not None}
    keys.update(f"{n}.{suffix}" for n in names for suffix in ("key_states", "value_states"))
    return keys


def check_record_editable(record_file, model) -> None:
    """Refuse (RecordFileError, one line) a record holding one of ``model``'s keys in an
    entry the write cannot edit, before anything is calibrated."""
    if not os.path.isfile(record_file):
        return
    blocked = uneditable_keys(record_file)
    if not blocked:
        return
    keys = _model_keys(model)
    hit = next((k for k in blocked if k in keys), None)
    if hit is not None:
        raise RecordFileError(
            f"record {os.fspath(record_file)}: the entry for layer {hit!r} {blocked[hit]}, which the "
            f"write after calibrating cannot edit without loss; rewrite that entry as 'record {{ ... }}' "
            f"or use another --record")
