"""Plain, one-channel-at-a-time versions of IFMR and HFMG, written as SPEC §3 reads.

They are slow on purpose: no batching over channels, Python loops where the spec
describes loops. The test suite and ``benchmarks/bench_algorithms.py`` check the
fast paths in :mod:`amct_hf.algorithms.ifmr` and :mod:`amct_hf.algorithms.hfmg`
against them.
"""
from __future__ import annotations

import math

import torch

from .convention import FLT_EPSILON, factors_from_clip, order_statistic_k

__all__ = [
    "reference_ifmr_channel", "reference_histc", "reference_merge",
    "reference_search_ranges", "reference_hfmg_loss", "reference_hfmg_channel", "reference_hfmg",
    "channels_of",
]


def channels_of(batches, per_channel: bool):
    """Split accumulated batches into one flat float32 tensor per channel (last dim)."""
    if per_channel:
        c = batches[0].shape[-1]
        return [torch.cat([b.float().reshape(-1, c)[:, j] for b in batches]) for j in range(c)]
    return [torch.cat([b.float().reshape(-1) for b in batches])]


def reference_ifmr_channel(data, asymmetric=True, max_percentile=0.999999, min_percentile=0.999999,
                           search_range=(0.7, 1.3), search_step=0.01):
    """IFMR on one flat float32 tensor. Returns (scale, offset, losses)."""
    n = data.numel()
    max0 = torch.topk(data, order_statistic_k(n, max_percentile), largest=True).values[-1]
    min0 = torch.topk(data, order_statistic_k(n, min_percentile), largest=False).values[-1]
    max0 = torch.clamp(max0, min=0.0)
    min0 = torch.clamp(min0, max=0.0)
    neg = False
    if not asymmetric:
        neg = bool(max0.abs() < min0.abs())
        max0 = torch.maximum(max0.abs(), min0.abs())
    ratios = torch.arange(search_range[0], search_range[1], search_step, dtype=torch.float32)
    cands = ratios * max0
    if asymmetric:
        scales = (cands - min0) / 255.0
    else:
        scales = cands / (128.0 if neg else 127.0)
    scales = torch.where(scales < FLT_EPSILON, torch.ones_like(scales), scales)
    losses = torch.empty_like(cands)
    for i in range(cands.numel()):
        lo = min0 if asymmetric else -cands[i]
        clipped = torch.clamp(data, lo, cands[i])
        quant = torch.round(clipped / scales[i]) * scales[i]
        losses[i] = torch.mean((quant - data) ** 2)
    best = int(torch.argmin(losses))
    scale = scales[best]
    offset = int(-torch.round(min0 / scale) - 128) if asymmetric else 0
    return float(scale), offset, losses


def reference_histc(data, bins, lo, hi):
    """torch.histc of one channel on [lo, hi], as AMCT calls it."""
    return torch.histc(data, bins, min=float(lo), max=float(hi))


def reference_merge(hist, lo, hi, new_hist, new_lo, new_hi):
    """Move the old histogram's counts onto the merged range bin by bin (SPEC §3.2)."""
    bins = hist.numel()
    w = (hi - lo) / bins
    new_w = (new_hi - new_lo) / bins
    merged = new_hist.clone().to(torch.float32)
    same = math.isclose(float(new_lo), float(lo), abs_tol=FLT_EPSILON) and \
        math.isclose(float(new_hi), float(hi), abs_tol=FLT_EPSILON)
    for i in range(bins):
        count = float(hist[i])
        if same:
            merged[i] += count
            continue
        lower = lo + i * w
        upper = lo + (i + 1) * w
        # AMCT indexes past the last bin here when an old bin of zero width sits on
        # the new maximum (a constant first batch); such a bin belongs to the last bin
        i_lo = min(int((lower - new_lo) // new_w), bins - 1)
        i_hi = min(int((upper - new_lo) // new_w), bins - 1)
        if i_lo == i_hi:
            merged[i_lo] += count
        else:
            new_upper = new_lo + (i_lo + 1) * new_w
            frac = (new_upper - lower) / (upper - lower)
            part = int(torch.tensor(count, dtype=torch.float32) * frac)
            merged[i_lo] += part
            merged[i_hi] += count - part
    return merged


def reference_search_ranges(hist):
    counts = [int(c) for c in hist.tolist()]
    left, right = 0, len(counts) - 1
    step = max(math.ceil(sum(counts) / 100000), 1)
    min_bins = math.ceil(len(counts) / 4)
    out = []
    while right - left > min_bins:
        tl, tr, ls, rs = left, right, 0, 0
        while tl < tr and ls < step:
            ls += counts[tl]
            tl += 1
        while tl < tr and rs < step:
            rs += counts[tr]
            tr -= 1
        if right - tr >= tl - left:
            right = tr
        else:
            left = tl
        out.append((left, right))
    return out


def reference_hfmg_loss(hist, lo, hi, left, right, dst_bins=256):
    """L2 error of mapping the source bins onto ``dst_bins`` bins over [left, right]."""
    bins = hist.numel()
    w = (hi - lo) / bins
    dst_w = w * (right - left + 1) / dst_bins
    if dst_w < FLT_EPSILON:
        return torch.tensor(0.0)
    src = torch.arange(bins)
    begin = (src - left) * w
    end = begin + w
    d_begin = torch.clamp(torch.div(begin, dst_w, rounding_mode="floor"), 0, dst_bins - 1)
    d_end = torch.clamp(torch.div(end, dst_w, rounding_mode="floor"), 0, dst_bins - 1)
    density = hist.to(torch.float32) / w

    def norm(a, b):
        return density * (b ** 3 - a ** 3) / 3

    c_begin = (d_begin + 0.5) * dst_w
    c_end = (d_end + 0.5) * dst_w
    half = dst_w / 2
    loss = norm(begin - c_begin, torch.full_like(begin, half))
    loss = loss + (d_end - d_begin - 1) * norm(torch.full_like(begin, -half), torch.full_like(begin, half))
    loss = loss + norm(torch.full_like(begin, -half), end - c_end)
    return loss.sum()


def reference_hfmg_channel(hist, lo, hi, asymmetric=True):
    ranges = reference_search_ranges(hist)
    losses = torch.stack([reference_hfmg_loss(hist, lo, hi, a, b) for a, b in ranges])
    left, right = ranges[int(torch.argmin(losses))]
    w = (hi - lo) / hist.numel()
    scale, offset = factors_from_clip(lo + (right + 1) * w, lo + left * w, asymmetric)
    return float(scale), int(offset)


def reference_hfmg(batches, asymmetric=True, per_channel=False, num_of_bins=4096):
    """HFMG over a list of batches: per-batch histograms merged as AMCT does."""
    per_batch = [channels_of([b], per_channel) for b in batches]
    scales, offsets = [], []
    for j in range(len(per_batch[0])):
        data = per_batch[0][j]
        lo, hi = data.min(), data.max()
        hist = reference_histc(data, num_of_bins, lo, hi)
        for chans in per_batch[1:]:
            data = chans[j]
            new_lo, new_hi = torch.minimum(lo, data.min()), torch.maximum(hi, data.max())
            new_hist = reference_histc(data, num_of_bins, new_lo, new_hi)
            hist = reference_merge(hist, lo, hi, new_hist, new_lo, new_hi)
            lo, hi = new_lo, new_hi
        s, o = reference_hfmg_channel(hist, lo, hi, asymmetric)
        scales.append(s)
        offsets.append(o)
    return scales, offsets
