"""Checks shared by the model-directory exports: what a record's "no information"
channels mean, whether the tensors an export writes survive the model's dtype, and
whether the checkpoint's projection weights agree with the KV geometry of its config.

Dead channels
-------------
The calibration writes a channel whose range is (numerically) zero -- an all-zero
``v_proj`` row, say -- with the placeholder factors of
:func:`amct_hf.algorithms.convention.factors_from_clip`: scale 1.0 and offset 0
(symmetric) or -128 (asymmetric). AMCT writes the same, so the record keeps them. They
carry no information about the channel's range; read as a range they would claim
``[0, 255]`` or ``[-128, 127]``. So, in a per-channel entry that also has live channels:

* the INT8 cache and the evaluation use them as written: the channel only ever holds 0,
  which ``q = round(0 / 1.0) + o`` and ``(q - o) * 1.0`` give back exactly;
* the model-directory exports replace them by the entry's smallest live scale and offset
  0 (:func:`neutral_channel_factors`): a shared scale (``vllm-fp8``'s maximum over the
  channels) is then set by the live channels alone, no value centre is folded for them
  (``ascend-c8``: ``mu = -offset * scale`` = 0), and 0 is still exactly representable;
* the factor files (json, safetensors, lmdeploy-ascend) hold the record as it is.

An entry whose channels are all at the placeholder (a per-tensor entry, or a layer that
never varied at all) is used as written: nothing tells it from a real range of exactly
127 (or 255) there, and a layer that only ever holds 0 is served exactly by any scale.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..algorithms.convention import QMIN
from ..errors import ExportError

__all__ = ["PLACEHOLDER_SCALE", "PLACEHOLDER_OFFSETS", "placeholder_channels",
           "neutral_channel_factors", "check_written_tensors", "check_kv_geometry"]

PLACEHOLDER_SCALE = 1.0
PLACEHOLDER_OFFSETS = (0, QMIN)

# tensor-name endings of the scales the exports write: each must be a positive normal number
_SCALE_ENDINGS = (".kv_cache_scale", ".k_scale", ".v_scale", ".q_scale")


def placeholder_channels(scales: Sequence[float], offsets: Sequence[int]) -> list[bool]:
    """Which channels hold the zero-range placeholder (see the module doc); all False for
    an entry whose channels are all placeholders (nothing to tell them from)."""
    flags = [s == PLACEHOLDER_SCALE and o in PLACEHOLDER_OFFSETS for s, o in zip(scales, offsets)]
    return flags if not all(flags) else [False] * len(flags)


def neutral_channel_factors(scales: Sequence[float], offsets: Sequence[int]) -> tuple[list, list]:
    """The factors with every placeholder channel set to (smallest live scale, 0): it
    widens no shared maximum, folds nothing and still represents 0 exactly."""
    flags = placeholder_channels(scales, offsets)
    if not any(flags):
        return list(scales), list(offsets)
    smallest = min(s for s, dead in zip(scales, flags) if not dead)
    return ([smallest if dead else s for s, dead in zip(scales, flags)],
            [0 if dead else o for o, dead in zip(offsets, flags)])


def _problem(name: str, tensor) -> str | None:
    import torch

    if not tensor.is_floating_point():
        return None
    values = tensor.float()
    if not bool(torch.isfinite(values).all()):
        return "not finite (inf or NaN)"
    if name.endswith(_SCALE_ENDINGS):
        tiny = torch.finfo(tensor.dtype).tiny
        low = float(values.min()) if values.numel() else 1.0
        if low <= 0:
            return f"{low!r}, not positive"
        if low < tiny:
            return f"{low!r}, subnormal (below {tiny!r}, the smallest normal {tensor.dtype})"
    return None


def check_written_tensors(tensors: Mapping[str, object], where: str) -> None:
    """Refuse (ExportError naming the tensor, hence its layer) a tensor an export is about
    to write, in the dtype it is written in, that is not finite, or a scale that is not a
    positive normal number of that dtype (0, or rounded into the subnormal range)."""
    for name, tensor in tensors.items():
        problem = _problem(name, tensor)
        if problem:
            raise ExportError(f"{where}: the exported tensor {name!r} would be {problem} in "
                              f"{tensor.dtype}; the record's factors for that layer cannot be "
                              f"served in this dtype (recalibrate, or export from a wider dtype)")


def check_kv_geometry(source) -> None:
    """Refuse a checkpoint whose ``k_proj`` / ``v_proj`` weights do not have the rows the
    config's KV geometry (``num_key_value_heads * head_dim``, as the model built from
    config.json computes them) gives: the export would write factors of the wrong length
    beside them."""
    from ..naming import attention_path, layer_kind

    shapes = {t.name: t.shape for t in source.tensors}
    for name, slot in source.kv_layout.items():
        if not name.endswith((".k_proj", ".v_proj")):
            continue
        weight = f"{name}.weight"
        shape = shapes.get(weight)
        if shape and len(shape) == 2 and shape[0] != slot.channels:
            raise ExportError(
                f"{source.model_dir}: {weight} has {shape[0]} output rows, but config.json gives "
                f"{attention_path(name)}'s {layer_kind(name)}s {slot.channels} channels "
                f"(num_key_value_heads * head_dim); fix num_key_value_heads / head_dim in config.json")
