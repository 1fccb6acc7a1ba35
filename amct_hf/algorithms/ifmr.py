"""IFMR (SPEC §3.1), exact, batched over channels.

The reference evaluates every candidate clip by quantizing every value: O(N) work
per candidate and channel. Here each channel is sorted once; a candidate's loss is
then a sum over at most ~257 quantization buckets, each bucket's
``sum((q - x)^2) = n q^2 - 2 q S1 + S2`` read from float64 prefix sums of the sorted
values. Values that land exactly on a bucket boundary contribute ``(s/2)^2`` on
either side, so the boundary search needs no exact tie handling.
"""
from __future__ import annotations

import numpy as np
import torch

from . import kernels
from .convention import FLT_EPSILON, order_statistic_k

__all__ = ["first_min", "ifmr_factors", "ifmr_initial_bounds", "ifmr_candidates", "clip_buckets", "ifmr_losses_sorted",
           "choose_scale", "asymmetric_offset", "prefix_sums", "TIE_RTOL", "CROSS_DEVICE_RTOL"]

# Losses closer than this (relative to mean(x^2)) are ties: the first candidate
# wins, as with the reference's argmin. Well above float64 noise, far below the
# gaps between distinct candidates.
TIE_RTOL = 1e-11
#: CPU == device semantics: the same candidates (float32 elementwise, identical on every
#: device); losses summed in float64 in another order may differ in the last bits, so a
#: device may pick another candidate only where it ties: its loss, evaluated on CPU, is
#: within this of the CPU's best (relative to sum(x^2)), never a candidate outside the tie.
CROSS_DEVICE_RTOL = 1e-10


def ifmr_initial_bounds(sorted_data: torch.Tensor, max_percentile: float, min_percentile: float):
    """max0/min0 of SPEC §3.1 step 1 from data sorted along the last dim ([C, N])."""
    n = sorted_data.shape[-1]
    max0 = sorted_data[:, n - order_statistic_k(n, max_percentile)]
    min0 = sorted_data[:, order_statistic_k(n, min_percentile) - 1]
    return torch.clamp(max0, min=0.0), torch.clamp(min0, max=0.0)


def ifmr_candidates(max0: torch.Tensor, min0: torch.Tensor, asymmetric: bool,
                    search_range=(0.7, 1.3), search_step=0.01):
    """Candidate clips and scales ([C, R] each), float32 exactly as the reference computes them.

    Returns (clip_hi, clip_lo, scales, min0) where min0 is the asymmetric lower
    bound (unused for symmetric)."""
    ratios = torch.arange(search_range[0], search_range[1], search_step,
                          dtype=torch.float32, device=max0.device)
    if asymmetric:
        hi = ratios[None, :] * max0[:, None]
        scales = (hi - min0[:, None]) / 255.0
        lo = min0[:, None].expand_as(hi)
    else:
        neg = max0.abs() < min0.abs()
        m = torch.maximum(max0.abs(), min0.abs())
        hi = ratios[None, :] * m[:, None]
        div = torch.where(neg, 128.0, 127.0).to(torch.float32)[:, None]
        scales = hi / div
        lo = -hi
    scales = torch.where(scales < FLT_EPSILON, torch.ones_like(scales), scales)
    return hi, lo, scales


def clip_buckets(hi: torch.Tensor, lo: torch.Tensor, scales: torch.Tensor):
    """(bucket index of every candidate's lower and upper clip end, rounded as the reference
    rounds them ([C, R] float32 each), the most buckets any candidate spans: one host read,
    <= ~257)."""
    j_lo, j_hi = torch.round(lo / scales), torch.round(hi / scales)
    return j_lo, j_hi, int((j_hi - j_lo).max().item()) + 1


def ifmr_losses_sorted(sorted_data: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor,
                       scales: torch.Tensor, prefix=None) -> torch.Tensor:
    """Sum of squared quantization errors for every candidate ([C, R], float64).

    ``sorted_data`` is [C, N] float32, sorted along N. ``prefix`` holds the prefix
    sums (weights, w*x, w*x^2), each [C, N + 1] float64; unit weights by default."""
    c, n = sorted_data.shape
    r_n = hi.shape[1]
    if prefix is None:
        prefix = prefix_sums(sorted_data)
    p0, p1, p2 = prefix
    j_lo, j_hi, nb = clip_buckets(hi, lo, scales)
    k = torch.arange(nb, device=sorted_data.device, dtype=torch.float32)
    j = j_lo[..., None] + k  # [C, R, nb]
    valid_edge = j < j_hi[..., None]
    # upper edge of bucket j, searched in the float32 data
    edges = ((j + 0.5) * scales[..., None]).reshape(c, -1).to(sorted_data.dtype).contiguous()
    idx = torch.searchsorted(sorted_data, edges).reshape(j.shape)
    idx = torch.where(valid_edge, idx, torch.full_like(idx, n)).reshape(c, -1)
    # a bucket starts where the one before ends (the first at 0, where the sums are 0): its
    # sums are differences of the prefix sums read at the ends, one read per end
    zero = torch.zeros(c, r_n, 1, dtype=p0.dtype, device=p0.device)
    cnt, s1, s2 = (torch.diff(t.gather(1, idx).reshape(j.shape), dim=-1, prepend=zero) for t in (p0, p1, p2))
    # q in float32, as round(x / s) * s is in the reference
    q = (j * scales[..., None]).to(torch.float64)
    per_bucket = torch.addcmul(cnt * q * q, 2.0 * q, s1, value=-1.0).add_(s2)
    return per_bucket.clamp_min_(0.0).sum(-1)


def prefix_sums(sorted_data: torch.Tensor, weights: torch.Tensor | None = None):
    x = sorted_data.to(torch.float64)
    w = torch.ones_like(x) if weights is None else weights.to(torch.float64)
    zero = torch.zeros_like(x[:, :1])
    return tuple(torch.cat([zero, v.cumsum(1)], 1) for v in (w, w * x, w * x * x))


def ifmr_factors(data: torch.Tensor, asymmetric: bool = True, max_percentile: float = 0.999999,
                 min_percentile: float = 0.999999, search_range=(0.7, 1.3), search_step: float = 0.01,
                 candidate_chunk: int = 16):
    """IFMR scales (float32 [C]) and offsets (int64 [C]) for ``data`` of shape [N, C].

    Each column is one channel (per-tensor callers pass [N, 1])."""
    rows = data.to(torch.float32).t().contiguous()
    del data
    compiled = kernels.use_kernels(rows)  # one dispatch for the sort and the loss search
    if compiled:
        # numpy's SIMD sort beats torch.sort on CPU by 2-3x here
        sorted_np = np.sort(rows.numpy(), axis=1)
        sorted_data = torch.from_numpy(sorted_np)
    else:
        sorted_data = rows.sort(dim=1).values
    del rows
    max0, min0 = ifmr_initial_bounds(sorted_data, max_percentile, min_percentile)
    hi, lo, scales = ifmr_candidates(max0, min0, asymmetric, search_range, search_step)
    if compiled:
        losses, sum_sq = kernels.ifmr_losses(sorted_np, hi.numpy(), lo.numpy(), scales.numpy())
        best = first_min(torch.from_numpy(losses), torch.from_numpy(sum_sq))
        scale = scales.gather(1, best[:, None])[:, 0]
    else:
        scale, _ = choose_scale(sorted_data, prefix_sums(sorted_data), hi, lo, scales, candidate_chunk)
    if asymmetric:
        offset = asymmetric_offset(min0, scale)
    else:
        offset = torch.zeros_like(scale, dtype=torch.int64)
    return scale, offset


def choose_scale(points, prefix, hi, lo, scales, candidate_chunk=16):
    """The winning candidate scale per channel and all candidate losses."""
    losses = torch.cat([
        ifmr_losses_sorted(points, hi[:, i:i + candidate_chunk], lo[:, i:i + candidate_chunk],
                           scales[:, i:i + candidate_chunk], prefix)
        for i in range(0, hi.shape[1], candidate_chunk)], dim=1)
    best = first_min(losses, prefix[2][:, -1])
    return scales.gather(1, best[:, None])[:, 0], losses


def asymmetric_offset(min0: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (-torch.round(min0 / scale) - 128.0).to(torch.int64)


def first_min(losses: torch.Tensor, sum_sq: torch.Tensor) -> torch.Tensor:
    """Index of the first loss within the tie tolerance (relative to sum(x^2)) of the row minimum."""
    tol = TIE_RTOL * sum_sq.to(torch.float64)[:, None]
    is_min = losses <= losses.min(dim=1, keepdim=True).values + tol
    return is_min.to(torch.int8).argmax(dim=1)
