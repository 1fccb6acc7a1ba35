"""The bounded-memory solves: IFMR and HFMG from an aligned histogram.

* IFMR: the candidate clips come from the exact extremes (exact order statistics up to
  rank ``K`` are kept beside the histogram; beyond that rank they are read from the
  histogram). Each candidate's loss is evaluated with every fine bin's values placed at
  the bin's exact mean. For a bin that no quantization threshold crosses this differs
  from the exact loss by the bin's variance, the same for every candidate; a crossed bin
  adds at most ``2 * s * w * n_bin``. So the exact loss of the chosen candidate is within
  ``tolerance = 2 * max_r eps_r`` (per channel, in squared-error units) of the exact IFMR
  optimum.
* HFMG: the ``num_of_bins`` histogram over [min, max] is rebuilt from the fine histogram
  (counts spread uniformly within each fine bin), then HFMG runs as usual: the
  equivalent of the operator fed all samples as one batch, up to the fine bins'
  resolution.
"""
from __future__ import annotations

import logging

import torch

from . import fused, kernels
from .aligned import AlignedHistogram
from .convention import order_statistic_k
from .hfmg import HistogramState, check_binnable, hfmg_factors
from .ifmr import asymmetric_offset, choose_scale, clip_buckets, first_min, ifmr_candidates, prefix_sums

__all__ = ["streaming_ifmr_factors", "streaming_ifmr_bounds", "streaming_hfmg_factors",
           "histogram_order_statistic", "extreme_ranks"]

logger = logging.getLogger("amct_hf")


def histogram_order_statistic(h: AlignedHistogram, k: int, largest: bool) -> torch.Tensor:
    """The k-th largest (or smallest) value per channel, read as its fine bin's mean."""
    counts = h.counts.flip(1) if largest else h.counts
    idx = (counts.cumsum(1) >= k).to(torch.int8).argmax(1, keepdim=True)
    if largest:
        idx = h.bins - 1 - idx
    return h.means().gather(1, idx)[:, 0].to(torch.float32)


def extreme_ranks(count: int, params) -> tuple[int, int]:
    """The ranks (from the top, from the bottom) of IFMR's initial bounds among ``count`` values."""
    return order_statistic_k(count, params.max_percentile), order_statistic_k(count, params.min_percentile)


def _order_statistic(h, extremes, k, largest, warn):
    if k <= extremes.shape[1]:
        return extremes[:, k - 1]
    if warn:
        logger.warning("IFMR percentile rank %d exceeds the %d exact extremes kept; "
                       "reading it from the histogram", k, extremes.shape[1])
    return histogram_order_statistic(h, k, largest)


def streaming_ifmr_bounds(h: AlignedHistogram, top: torch.Tensor, bottom: torch.Tensor, count: int,
                          params, warn: bool = True) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """IFMR's (max0, min0) per channel and whether both were read exactly from the kept
    extremes (otherwise from the histogram's bin means, logged unless ``warn`` is False)."""
    k_top, k_bottom = extreme_ranks(count, params)
    exact = k_top <= top.shape[1] and k_bottom <= bottom.shape[1]
    max0 = _order_statistic(h, top, k_top, True, warn).clamp(min=0)
    min0 = _order_statistic(h, bottom, k_bottom, False, warn).clamp(max=0)
    return max0, min0, exact


def streaming_ifmr_factors(h: AlignedHistogram, top: torch.Tensor, bottom: torch.Tensor,
                           count: int, params, warn: bool = True
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scales, offsets, tolerance) per channel from the histogram (with per-bin offsets),
    the ``[C, K]`` largest (descending) / smallest (ascending) values, and the count of
    values per channel."""
    p = params
    max0, min0, _ = streaming_ifmr_bounds(h, top, bottom, count, p, warn)
    hi, lo, scales = ifmr_candidates(max0, min0, p.asymmetric, p.search_range, p.search_step)
    points = h.means()
    if h._compiled(points):
        losses, sum_sq, tol = kernels.ifmr_losses(
            points.contiguous().numpy(), hi.numpy(), lo.numpy(), scales.numpy(),
            h.counts.contiguous().numpy(), (h.level.numpy(), h.origin.numpy()))
        best = first_min(torch.from_numpy(losses), torch.from_numpy(sum_sq))
        scale = scales.gather(1, best[:, None])[:, 0]
        tolerance = torch.from_numpy(tol)
    elif fused.use_fused(points):  # one program per channel and candidate, no [C, R, buckets] temporaries
        losses, sum_sq, crossed = fused.ifmr_losses(points, h.counts, hi, lo, scales, h.inverse_width, h.origin)
        scale = scales.gather(1, first_min(losses, sum_sq)[:, None])[:, 0]
        # as the compiled kernel: 2 * max over candidates of 2 * scale * bin width * values crossed
        tolerance = (2.0 * (2.0 * scales.double() * h.width[:, None] * crossed)).max(1).values
    else:
        scale, _ = choose_scale(points, prefix_sums(points, h.counts), hi, lo, scales)
        tolerance = _tolerance(h, hi, lo, scales)
    if p.asymmetric:
        return scale, asymmetric_offset(min0, scale), tolerance
    return scale, torch.zeros_like(scale, dtype=torch.int64), tolerance


def _tolerance(h: AlignedHistogram, hi, lo, scales) -> torch.Tensor:
    """2 * max over candidates of the bound on |streaming - exact| loss, per channel."""
    j_lo, j_hi, nb = clip_buckets(hi, lo, scales)
    j = j_lo[..., None] + torch.arange(nb, device=scales.device, dtype=torch.float32)
    t = ((j + 0.5) * scales[..., None]).double()
    c = t.shape[0]
    # the bin holding t (the last edge at or below it), read off the aligned grid: the edges
    # are (origin + k) * 2**level and t * 2**-level is exact, so no search over the edges
    k = torch.floor(torch.ldexp(t, -h.level.double()[:, None, None])).to(torch.int64) - h.origin[:, None, None]
    k = k.clamp_(-1, h.bins - 1)
    n = h.counts.gather(1, k.clamp(0, h.bins - 1).reshape(c, -1)).reshape(t.shape)
    n = torch.where((j < j_hi[..., None]) & (k >= 0), n, torch.zeros_like(n))
    eps = 2.0 * scales.double() * h.width[:, None] * n.sum(-1)
    return 2.0 * eps.max(1).values


def streaming_hfmg_factors(h: AlignedHistogram, num_of_bins: int, asymmetric: bool):
    """HFMG (scales, offsets) from the fine histogram (counts only are needed)."""
    check_binnable(h.lo, h.hi, num_of_bins)
    return hfmg_factors(HistogramState(h.resample(num_of_bins), h.lo, h.hi), asymmetric)
