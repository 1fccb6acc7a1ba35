"""The INT8 quantization convention (SPEC §3), in one place.

``q = clip(round(x / s) + o, -128, 127)`` and ``x_hat = (q - o) * s``: a channel with
scale ``s`` and offset ``o`` represents exactly ``[(-128 - o) * s, (127 - o) * s]``.
Every module that quantizes, dequantizes, derives factors from a range, or checks
factors read from a file uses these functions.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["FLT_EPSILON", "QMIN", "QMAX", "quantize", "dequantize", "fake_quantize",
           "factors_from_clip", "minmax_factors", "clip_range", "order_statistic_k",
           "factor_problem"]

FLT_EPSILON = 1.192092896e-7
QMIN, QMAX = -128, 127


def quantize(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``clip(round(x / s) + o, -128, 127)`` as int8 (``x / s`` in float32, round half to even)."""
    return (torch.round(x.float() / scale) + offset).clamp_(QMIN, QMAX).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(q - o) * s`` in ``dtype``."""
    return ((q.float() - offset) * scale).to(dtype)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                  clipped: bool = False):
    """Quantize-dequantize, in float32; with ``clipped``, also the mask of the values
    outside the representable range."""
    raw = torch.round(x.float() / scale) + offset
    x_hat = (raw.clamp(QMIN, QMAX) - offset) * scale
    return (x_hat, (raw < QMIN) | (raw > QMAX)) if clipped else x_hat


def clip_range(scale: float, offset: int) -> tuple[float, float]:
    """The ``[lo, hi]`` a channel represents exactly; anything outside is clipped."""
    return (QMIN - offset) * scale, (QMAX - offset) * scale


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


def minmax_factors(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric factors covering ``[lo, hi]`` (and 0) elementwise: scale float32,
    offset float32 (integer-valued, ready for the arithmetic above)."""
    scale, offset = factors_from_clip(hi, lo, asymmetric=True)
    return scale, offset.to(torch.float32)


def factor_problem(scales: Sequence[float], offsets: Sequence[int]) -> str | None:
    """Why these factors cannot be used, or None: every reader of factors (record,
    exports, the INT8 cache, evaluation) refuses the same things. A scale must be a finite
    positive float32; an offset an integer the INT8 grid can hold (so that zero, or at
    least one end of the range, is representable)."""
    if len(scales) == 0:
        return "no factors"
    if len(scales) != len(offsets):
        return f"{len(scales)} scales but {len(offsets)} offsets"
    for i, s in enumerate(scales):
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) \
                or not 0 < s <= 3.4028234663852886e38:
            return f"scale[{i}] = {s!r} is not a finite positive float32"
    for i, o in enumerate(offsets):
        if isinstance(o, bool) or not isinstance(o, int) or not QMIN <= o <= QMAX:
            return f"offset[{i}] = {o!r} is not an integer in [{QMIN}, {QMAX}]"
    return None
