"""Shared quantization conventions (SPEC §3): q = clip(round(x / s) + o, -128, 127)."""
from __future__ import annotations

import torch

__all__ = ["FLT_EPSILON", "QMIN", "QMAX", "factors_from_clip", "order_statistic_k"]

FLT_EPSILON = 1.192092896e-7
QMIN, QMAX = -128, 127


def order_statistic_k(n: int, percentile: float) -> int:
    """Rank (1-based, from the extreme) of the IFMR initial bound among ``n`` values."""
    if 1.0 - percentile < FLT_EPSILON:
        return 1
    return max(1, n - int(percentile * n))


def factors_from_clip(clip_max: torch.Tensor, clip_min: torch.Tensor, asymmetric: bool):
    """Scale (float32) and offset (int64) from a clip range, as HFMG and min-max do.

    Computed in float32 like the reference implementation, so that the scale is
    bit-identical to what AMCT writes.
    """
    clip_max = clip_max.to(torch.float32)
    clip_min = clip_min.to(torch.float32)
    if asymmetric:
        hi = torch.clamp(clip_max, min=0.0)
        lo = torch.clamp(clip_min, max=0.0)
        scale = (hi - lo) / 255.0
        offset = torch.where(hi != lo, -128.0 - lo / scale, torch.full_like(scale, -128.0))
        tiny = scale < FLT_EPSILON
        offset = torch.where(tiny, torch.full_like(offset, -128.0), offset)
    else:
        neg = clip_max.abs() < clip_min.abs()
        bound = torch.where(clip_max.abs() > clip_min.abs(), clip_max.abs(), clip_min.abs())
        scale = bound / torch.where(neg, torch.full_like(bound, 128.0), torch.full_like(bound, 127.0))
        offset = torch.zeros_like(scale)
        tiny = scale < FLT_EPSILON
    scale = torch.where(tiny, torch.ones_like(scale), scale)
    return scale, offset.round().to(torch.int64)
