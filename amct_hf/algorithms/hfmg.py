"""HFMG (SPEC §3.2), batched over channels.

Histograms, merges and the candidate walk follow AMCT's arithmetic (float32 bin
edges, ``torch.histc`` binning) so that the histograms are identical. The L2 loss
of a candidate is the integral of ``density * (x - centre(x))^2`` over the source
histogram, where ``centre(x)`` is the centre of the destination bin holding ``x``
(the two outer destination bins extend to infinity: that is the clamping of the
reference formula). Instead of visiting every source bin per candidate (O(bins)),
summation by parts reduces it to one term per destination edge, read from prefix sums
(see :func:`hfmg_losses`): O(256) per candidate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import kernels
from .convention import FLT_EPSILON, factors_from_clip

__all__ = ["HistogramState", "histc_per_channel", "merge_histograms", "search_ranges",
           "hfmg_losses", "hfmg_factors", "DST_BINS", "TIE_RTOL", "CROSS_DEVICE_RTOL"]

DST_BINS = 256
#: losses within this relative distance of the best are ties (the first candidate wins)
TIE_RTOL = 1e-12
#: CPU == device semantics: histograms (integer counts) and candidate walks are identical;
#: the float64 losses may differ in the last bits, so a device may pick another candidate
#: only where it ties: its loss, evaluated on CPU, within this of the best (relative).
CROSS_DEVICE_RTOL = 1e-9
#: steps of the HFMG candidate walk between two host reads of "is any channel still walking"
WALK_CHECK_EVERY = 64
#: float64 elements per temporary of the batched loss evaluation (torch path): 2**25 = 256 MiB
LOSS_CHUNK_ELEMENTS = 1 << 25


def check_binnable(lo: torch.Tensor, hi: torch.Tensor, bins: int) -> None:
    """HFMG bins in float32 (as ``torch.histc``): ``(x - lo) * bins`` must not overflow.
    A range that wide (above ~1e35 for 4096 bins) is a numerical fault, not an activation."""
    width = (hi.to(torch.float32) - lo.to(torch.float32)) * bins
    if not bool(torch.isfinite(width).all()):
        bad = int((~torch.isfinite(width)).nonzero()[0, 0])
        raise ValueError(
            f"activation range [{float(lo[bad]):.3g}, {float(hi[bad]):.3g}] (channel {bad}) is too "
            f"wide for HFMG: range x num_of_bins overflows float32, the precision HFMG bins in")


def histc_per_channel(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bins: int) -> torch.Tensor:
    """``torch.histc(x[:, c], bins, lo[c], hi[c])`` for every column c at once ([C, bins], float64).

    Same float32 arithmetic as the CPU histc kernel, including its widening of an
    empty range to [lo - 1, hi + 1]."""
    x = x.to(torch.float32)
    n, c = x.shape
    lo = lo.to(torch.float32)
    hi = hi.to(torch.float32)
    same = lo == hi
    lo_e = torch.where(same, lo - 1.0, lo)
    hi_e = torch.where(same, hi + 1.0, hi)
    if kernels.use_kernels(x):
        check_binnable(lo_e, hi_e, bins)
        return torch.from_numpy(kernels.histc_rows(x.contiguous().numpy(), lo_e.contiguous().numpy(),
                                                   hi_e.contiguous().numpy(), bins))
    # The torch path reads nothing back to the host: a range too wide to bin yields
    # meaningless counts here and is refused by the solve (hfmg_factors checks the range).
    pos = ((x - lo_e) * bins) / (hi_e - lo_e)
    inside = (x >= lo_e) & (x <= hi_e)
    # values outside [lo, hi] go to a spare bin per channel, dropped afterwards: a fixed-size
    # scatter instead of boolean indexing (data-dependent shape) or bincount (reads max back)
    idx = torch.where(inside, pos.nan_to_num(0.0).clamp(0, bins - 1).to(torch.int64), bins)
    idx = idx + torch.arange(c, device=x.device) * (bins + 1)
    counts = torch.zeros(c * (bins + 1), dtype=torch.int64, device=x.device)
    counts.scatter_add_(0, idx.reshape(-1), torch.ones_like(idx.reshape(-1)))
    return counts.reshape(c, bins + 1)[:, :bins].to(torch.float64)


def _isclose(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # math.isclose(a, b, abs_tol=FLT_EPSILON), as AMCT tests for an unchanged range
    a, b = a.double(), b.double()
    return (a - b).abs() <= torch.maximum(1e-9 * torch.maximum(a.abs(), b.abs()),
                                          torch.full_like(a, FLT_EPSILON))


def merge_histograms(hist, lo, hi, new_hist, new_lo, new_hi) -> torch.Tensor:
    """Counts of ``hist`` on [lo, hi] moved onto [new_lo, new_hi] and added to ``new_hist``."""
    c, bins = hist.shape
    dev = hist.device
    i = torch.arange(bins, device=dev, dtype=torch.float32)[None, :]
    w = ((hi - lo) / bins)[:, None]
    nlo = new_lo[:, None]
    nw = ((new_hi - new_lo) / bins)[:, None]
    lower = lo[:, None] + i * w
    upper = lo[:, None] + (i + 1) * w
    i_lo = torch.div(lower - nlo, nw, rounding_mode="floor")
    i_hi = torch.div(upper - nlo, nw, rounding_mode="floor")
    # clamped: AMCT indexes past the end for a zero-width old bin on the new maximum
    i_lo = torch.nan_to_num(i_lo, nan=0.0).clamp(0, bins - 1).to(torch.int64)
    i_hi = torch.nan_to_num(i_hi, nan=0.0).clamp(0, bins - 1).to(torch.int64)
    frac = (nlo + (i_lo + 1).to(torch.float32) * nw - lower) / (upper - lower)
    part = torch.trunc(hist.to(torch.float32) * frac).to(torch.float64)
    split = i_lo != i_hi
    to_lo = torch.where(split, part, hist)
    to_hi = torch.where(split, hist - part, torch.zeros_like(hist))
    moved = torch.zeros_like(hist)
    moved.scatter_add_(1, i_lo, to_lo).scatter_add_(1, i_hi, to_hi)
    same = (_isclose(new_lo, lo) & _isclose(new_hi, hi))[:, None]
    return new_hist + torch.where(same, hist, moved)


@dataclass
class HistogramState:
    """Per-channel histograms merged batch by batch exactly as AMCT merges them."""
    hist: torch.Tensor  # [C, bins] float64 counts
    lo: torch.Tensor    # [C] float32
    hi: torch.Tensor    # [C] float32

    @classmethod
    def from_batch(cls, x: torch.Tensor, bins: int) -> HistogramState:
        x = x.to(torch.float32)
        lo, hi = x.amin(0), x.amax(0)
        return cls(histc_per_channel(x, lo, hi, bins), lo, hi)

    def update(self, x: torch.Tensor) -> None:
        x = x.to(torch.float32)
        new_lo = torch.minimum(self.lo, x.amin(0))
        new_hi = torch.maximum(self.hi, x.amax(0))
        new_hist = histc_per_channel(x, new_lo, new_hi, self.hist.shape[1])
        self.hist = merge_histograms(self.hist, self.lo, self.hi, new_hist, new_lo, new_hi)
        self.lo, self.hi = new_lo, new_hi


def search_ranges(hist: torch.Tensor):
    """Candidate (left, right) bin ranges of every channel ([C, K] each) and a validity mask."""
    c, bins = hist.shape
    dev = hist.device
    prefix = torch.cat([torch.zeros(c, 1, dtype=torch.float64, device=dev), hist.cumsum(1)], 1)
    total = prefix[:, -1]
    step = torch.clamp(torch.ceil(total / 100000.0), min=1.0)[:, None]
    min_bins = math.ceil(bins / 4)
    left = torch.zeros(c, 1, dtype=torch.int64, device=dev)
    right = torch.full((c, 1), bins - 1, dtype=torch.int64, device=dev)
    lefts, rights, valids = [], [], []
    # Every active step narrows [left, right] by at least one bin, so the walk ends within
    # bins - 1 - min_bins steps. Whether any channel is still active is read back to the
    # host only every WALK_CHECK_EVERY steps (finished channels pass through unchanged and
    # their extra columns are marked invalid), not once per step.
    for it in range(max(0, bins - 1 - min_bins)):
        active = (right - left) > min_bins
        if it % WALK_CHECK_EVERY == 0 and not bool(active.any()):
            break
        target = prefix.gather(1, left) + step
        tl = torch.minimum(torch.searchsorted(prefix, target, side="left"), right)
        target = prefix.gather(1, right + 1) - step
        u = torch.searchsorted(prefix, target, side="right") - 1
        tr = torch.maximum(u - 1, tl)
        move_right = (right - tr) >= (tl - left)
        right = torch.where(active & move_right, tr, right)
        left = torch.where(active & ~move_right, tl, left)
        lefts.append(left)
        rights.append(right)
        valids.append(active)
    if not lefts:
        empty = torch.zeros(c, 0, dtype=torch.int64, device=dev)
        return empty, empty.clone(), torch.zeros(c, 0, dtype=torch.bool, device=dev)
    return torch.cat(lefts, 1), torch.cat(rights, 1), torch.cat(valids, 1)


def loss_tables(hist: torch.Tensor):
    """Per-channel tables for :func:`hfmg_losses`: prefix sums of ``h`` and ``h * (i + 1/2)``
    over bins (indices centred on the histogram's middle to keep float64 sums small), the
    counts, and the candidate-independent totals."""
    c, bins = hist.shape
    i = torch.arange(bins, device=hist.device, dtype=torch.float64) - bins / 2
    zero = torch.zeros(c, 1, dtype=torch.float64, device=hist.device)
    q0 = torch.cat([zero, hist.cumsum(1)], 1)
    q1 = torch.cat([zero, (hist * (i + 0.5)).cumsum(1)], 1)
    m0 = q0[:, -1]
    m1 = q1[:, -1]
    return q0, q1, torch.cat([hist, zero], 1), (m0, m1, second_moment(hist))


def _second_moment_terms(hist: torch.Tensor) -> torch.Tensor:
    """Each bin's count times its squared (centred) position, the bin uniform ([C, bins] float64)."""
    i = torch.arange(hist.shape[1], device=hist.device, dtype=torch.float64) - hist.shape[1] / 2
    return hist * (i * i + i + 1.0 / 3.0)


def second_moment(hist: torch.Tensor) -> torch.Tensor:
    """Sum over bins of the squared (centred) positions, each bin uniform ([C] float64)."""
    return _second_moment_terms(hist).sum(1)


def hfmg_losses(hist: torch.Tensor, left: torch.Tensor, right: torch.Tensor, tables=None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
    """L2 loss of every candidate ([C, K], float64, in units of source-bin width squared).

    With ``M0(t), M1(t)`` the count and first moment of the (piecewise uniform) source
    density below ``t``, destination edges ``P_k = L + k*D`` (``D = n / 256``) and centres
    ``c_d``, summation by parts turns ``sum_d int (x - c_d)^2`` into
    ``M2 - 2 c_255 M1 + c_255^2 M0 + 2 D sum_k [M1(P_k) - P_k M0(P_k)]``, and for
    ``P`` in bin ``f`` with ``r = P - f``: ``M1(P) - P M0(P) = Q1[f] - P Q0[f] - h_f r^2 / 2``.
    ``rows``: the channels (of ``tables``) that ``left``/``right`` belong to (default: all).
    """
    q0, q1, h, (m0, m1, m2) = tables if tables is not None else loss_tables(hist)
    c, bins = left.shape[0], q0.shape[1] - 1
    if rows is None:
        def gather(table, index):
            return table.gather(1, index)
    else:
        base = rows[:, None] * (bins + 1)
        m0, m1, m2 = m0[rows], m1[rows], m2[rows]

        def gather(table, index):  # from the whole table: no copy of the active rows
            return table.reshape(-1)[base + index]
    shift = bins / 2
    L = left.to(torch.float64) - shift
    D = (right - left + 1).to(torch.float64) / DST_BINS
    k = torch.arange(1, DST_BINS, device=q0.device, dtype=torch.float64)
    p = L[..., None] + k * D[..., None]  # [C, K, 255] inner destination edges (exact)
    f = torch.floor(p)
    r = p - f
    idx = (f + shift).to(torch.int64).clamp(0, bins).reshape(c, -1)
    term = (gather(q1, idx) - p.reshape(c, -1) * gather(q0, idx)
            - 0.5 * gather(h, idx) * (r * r).reshape(c, -1))
    edge_sum = term.reshape(p.shape).sum(-1)
    c255 = L + (DST_BINS - 0.5) * D
    return (m2[:, None] - 2.0 * c255 * m1[:, None] + c255 * c255 * m0[:, None] + 2.0 * D * edge_sum)


def hfmg_factors(state: HistogramState, asymmetric: bool = True, candidate_chunk: int = 64):
    """HFMG scales (float32 [C]) and offsets (int64 [C]) from accumulated histograms."""
    hist, lo, hi = state.hist, state.lo, state.hi
    bins = hist.shape[1]
    check_binnable(lo, hi, bins)  # the torch path's per-batch binning defers this check to here
    fast = kernels.use_kernels(hist)
    if fast:
        h = hist.contiguous().numpy()
        left, right, count = (torch.from_numpy(a) for a in kernels.hfmg_walk(h, math.ceil(bins / 4)))
        valid = torch.arange(left.shape[1])[None, :] < count[:, None]
    else:
        left, right, valid = search_ranges(hist)
    w = (hi - lo) / bins
    dst_w = w[:, None] * (right - left + 1).to(torch.float32) / DST_BINS
    if fast:  # the kernel builds the prefix tables itself, per channel
        # skipping candidates is safe only where none would have its loss forced to zero below
        prune = ~((dst_w < FLT_EPSILON) & valid).any(1)
        losses = torch.from_numpy(kernels.hfmg_losses(
            h, second_moment(hist).numpy(), left.numpy(), right.numpy(), count.numpy(), DST_BINS, prune.numpy()))
    else:
        prune = ~((dst_w < FLT_EPSILON) & valid).any(1)
        losses = _pruned_losses(hist, left, right, valid, prune, candidate_chunk)
    losses = torch.where(dst_w < FLT_EPSILON, torch.zeros_like(losses), losses)
    losses = torch.where(valid, losses, torch.full_like(losses, float("inf")))
    best_loss = losses.min(1, keepdim=True).values
    best = (losses <= best_loss * (1 + TIE_RTOL)).to(torch.int8).argmax(1, keepdim=True)
    bl, br = left.gather(1, best)[:, 0], right.gather(1, best)[:, 0]
    clip_min = lo + bl.to(torch.float32) * w
    clip_max = lo + (br + 1).to(torch.float32) * w
    return factors_from_clip(clip_max, clip_min, asymmetric)


def _pruned_losses(hist, left, right, valid, prune, candidate_chunk: int) -> torch.Tensor:
    """The torch path's losses ([C, K], inf where not evaluated), pruned as the compiled
    kernel prunes: every value outside a candidate's [L, R) costs at least its squared
    distance to that interval, a bound that only grows along the walk, so once it exceeds
    the best loss so far (by more than rounding) that candidate and every later one of the
    channel are skipped; they could not win. Candidates run in chunks of the walk over the
    channels still in play (the solve may read back: one read per chunk), so most of the
    walk is never evaluated."""
    c, bins = hist.shape
    tables = loss_tables(hist)
    q0, q1, _, (m0, m1, m2) = tables
    q2 = torch.cat([torch.zeros(c, 1, dtype=torch.float64, device=hist.device),
                    _second_moment_terms(hist).cumsum(1)], 1)
    lo_edge, hi_edge, a, b = left.double() - bins / 2, (right + 1).double() - bins / 2, left, right + 1
    bound = (lo_edge * lo_edge * q0.gather(1, a) - 2.0 * lo_edge * q1.gather(1, a) + q2.gather(1, a)
             + hi_edge * hi_edge * (m0[:, None] - q0.gather(1, b)) - 2.0 * hi_edge * (m1[:, None] - q1.gather(1, b))
             + (m2[:, None] - q2.gather(1, b)))
    slack = 1e-9 * (m2 + m0 * bins * bins)
    losses = torch.full(left.shape, float("inf"), dtype=torch.float64, device=hist.device)
    best = torch.full((c,), float("inf"), dtype=torch.float64, device=hist.device)
    rows = torch.arange(c, device=hist.device)
    k_n = left.shape[1]
    chunk = max(1, min(candidate_chunk, LOSS_CHUNK_ELEMENTS // max(1, c * DST_BINS)))
    for j in range(0, k_n, chunk):
        cols = slice(j, min(j + chunk, k_n))
        part = hfmg_losses(hist, left[rows, cols], right[rows, cols], tables, rows=rows)
        before = torch.minimum(best[rows, None], torch.cat([
            torch.full_like(part[:, :1], float("inf")), torch.cummin(part, 1).values[:, :-1]], 1))
        cut = prune[rows, None] & valid[rows, cols] & (bound[rows, cols] > before + slack[rows, None])
        cut = cut.to(torch.int8).cumsum(1) > 0  # the first pruned candidate and every later one
        part = torch.where(cut, torch.full_like(part, float("inf")), part)
        losses[rows, cols] = part
        best[rows] = torch.minimum(best[rows], part.min(1).values)
        if cols.stop >= k_n:
            break
        rows = rows[~cut.any(1) & valid[rows, cols.stop]]
        if rows.numel() == 0:
            break
    return losses
