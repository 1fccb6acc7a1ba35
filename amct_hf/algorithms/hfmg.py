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
from .hfmg_walk import search_ranges, search_ranges_stepwise, walk_chunk, walk_step_size

__all__ = ["HistogramState", "histc_per_channel", "merge_histograms", "search_ranges", "search_ranges_stepwise",
           "walk_chunk",
           "hfmg_losses", "hfmg_factors", "DST_BINS", "TIE_RTOL", "CROSS_DEVICE_RTOL"]

DST_BINS = 256
#: losses within this relative distance of the best are ties (the first candidate wins)
TIE_RTOL = 1e-12
#: CPU == device semantics: histograms (integer counts) and candidate walks are identical;
#: the float64 losses may differ in the last bits, so a device may pick another candidate
#: only where it ties: its loss, evaluated on CPU, within this of the best (relative).
CROSS_DEVICE_RTOL = 1e-9
#: edges (candidates x 255) per temporary of the batched loss evaluation (torch path): 2**25
LOSS_CHUNK_ELEMENTS = 1 << 25
#: candidates of the torch path's first chunk of walk and losses (each next chunk twice as long)
FIRST_CHUNK = 4


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


def loss_tables(hist: torch.Tensor):
    """Per-channel tables of the losses: ``(tab, m2)`` with ``tab`` [3, C, bins + 1] float64
    the prefix sums over bins of ``h``, ``h * (i + 1/2)`` and ``h * (i^2 + i + 1/3)`` (the
    count, first and second moment of the bins below an edge, each bin uniform; indices
    centred on the histogram's middle to keep float64 sums small) and ``m2`` [C] the total
    second moment (:func:`second_moment`)."""
    c, bins = hist.shape
    i = torch.arange(bins, device=hist.device, dtype=torch.float64) - bins / 2
    moments = torch.stack([i + 0.5, i * i + i + 1.0 / 3.0])[:, None, :] * hist[None]
    # the sums written in place behind a zero column (an edge below every bin)
    tab = torch.empty(3, c, bins + 1, dtype=torch.float64, device=hist.device)
    tab[:, :, 0] = 0.0
    torch.cumsum(hist, -1, out=tab[0, :, 1:])
    torch.cumsum(moments, -1, out=tab[1:, :, 1:])
    return tab, moments[1].sum(1)


def _second_moment_terms(hist: torch.Tensor) -> torch.Tensor:
    """Each bin's count times its squared (centred) position, the bin uniform ([C, bins] float64)."""
    i = torch.arange(hist.shape[1], device=hist.device, dtype=torch.float64) - hist.shape[1] / 2
    return hist * (i * i + i + 1.0 / 3.0)


def second_moment(hist: torch.Tensor) -> torch.Tensor:
    """Sum over bins of the squared (centred) positions, each bin uniform ([C] float64)."""
    return _second_moment_terms(hist).sum(1)


def _lookup(table: torch.Tensor, index: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """``table[row, index]`` for [R, ...] indices: of every row in order, or of ``rows``
    (read from the whole table: no copy of those rows)."""
    if rows is None:
        return table.gather(1, index.reshape(index.shape[0], -1)).reshape(index.shape)
    base = (rows * table.shape[1]).reshape(-1, *([1] * (index.dim() - 1)))
    return table.reshape(-1)[base + index]


def hfmg_losses(hist: torch.Tensor, left: torch.Tensor, right: torch.Tensor, tables=None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
    """L2 loss of every candidate ([C, K], float64, in units of source-bin width squared).

    With ``M0(t), M1(t)`` the count and first moment of the (piecewise uniform) source
    density below ``t``, destination edges ``P_k = L + k*D`` (``D = n / 256``) and centres
    ``c_d``, summation by parts turns ``sum_d int (x - c_d)^2`` into
    ``M2 - 2 c_255 M1 + c_255^2 M0 + 2 D sum_k [M1(P_k) - P_k M0(P_k)]``, and for
    ``P`` in bin ``f`` with ``r = P - f``: ``M1(P) - P M0(P) = Q1[f] - P Q0[f] - h_f r^2 / 2``.
    ``tables``: :func:`loss_tables` of ``hist``; ``rows``: the channels (of ``hist`` and
    ``tables``) that ``left``/``right`` belong to (default: all, in order).

    The edges are multiples of 1/256 below 2**14 (22 significant bits), exact in float32,
    and so are their bin and fraction: the per-edge temporaries are float32 where the
    values are exact, and the float64 arithmetic on the tables is that of the formula."""
    tab, m2 = tables if tables is not None else loss_tables(hist)
    q0, q1 = tab[0], tab[1]
    bins = hist.shape[1]
    m0, m1 = q0[:, -1], q1[:, -1]
    if rows is not None:
        m0, m1, m2 = m0[rows], m1[rows], m2[rows]
    shift = bins / 2
    n = right - left + 1
    k = torch.arange(1, DST_BINS, device=hist.device, dtype=torch.float32)
    pos = torch.addcmul(left.to(torch.float32)[..., None], k, (n.to(torch.float32) / DST_BINS)[..., None])
    f = torch.floor(pos)
    r = pos - f
    p = pos - shift  # [C, K, 255] inner destination edges (exact)
    idx = f.to(torch.int64).clamp_(0, bins)
    term = torch.addcmul(_lookup(q1, idx, rows), p, _lookup(q0, idx, rows), value=-1.0)
    # the fraction is 0 at the last edge (bin ``bins``): any count there gives the same term
    term = torch.addcmul(term, _lookup(hist, idx.clamp_(max=bins - 1), rows), r * r, value=-0.5)
    edge_sum = term.sum(-1)
    L = left.to(torch.float64) - shift
    D = n.to(torch.float64) / DST_BINS
    c255 = L + (DST_BINS - 0.5) * D
    return (m2[:, None] - 2.0 * c255 * m1[:, None] + c255 * c255 * m0[:, None] + 2.0 * D * edge_sum)


def _outside_bound(tab, m2, left, right, rows):
    """A lower bound of every candidate's loss ([R, K] float64): every value outside its
    [L, R) costs at least its squared distance to that interval (it is quantized to an end
    bin's centre, further inside)."""
    bins = tab.shape[2] - 1
    q0, q1, q2 = tab[0], tab[1], tab[2]
    m0, m1 = q0[:, -1], q1[:, -1]
    if rows is not None:
        m0, m1, m2 = m0[rows], m1[rows], m2[rows]
    a, b = left.clamp(0, bins), (right + 1).clamp(0, bins)
    lo_edge, hi_edge = left.double() - bins / 2, (right + 1).double() - bins / 2
    return (lo_edge * lo_edge * _lookup(q0, a, rows) - 2.0 * lo_edge * _lookup(q1, a, rows)
            + _lookup(q2, a, rows)
            + hi_edge * hi_edge * (m0[:, None] - _lookup(q0, b, rows))
            - 2.0 * hi_edge * (m1[:, None] - _lookup(q1, b, rows)) + (m2[:, None] - _lookup(q2, b, rows)))


def hfmg_factors(state: HistogramState, asymmetric: bool = True, first_chunk: int = FIRST_CHUNK):
    """HFMG scales (float32 [C]) and offsets (int64 [C]) from accumulated histograms."""
    hist, lo, hi = state.hist, state.lo, state.hi
    bins = hist.shape[1]
    check_binnable(lo, hi, bins)  # the torch path's per-batch binning defers this check to here
    w = (hi - lo) / bins
    if kernels.use_kernels(hist):
        h = hist.contiguous().numpy()
        left, right, count = (torch.from_numpy(a) for a in kernels.hfmg_walk(h, math.ceil(bins / 4)))
        valid = torch.arange(left.shape[1])[None, :] < count[:, None]
        dst_w = w[:, None] * (right - left + 1).to(torch.float32) / DST_BINS
        # skipping candidates is safe only where none would have its loss forced to zero below
        prune = ~((dst_w < FLT_EPSILON) & valid).any(1)
        losses = torch.from_numpy(kernels.hfmg_losses(
            h, second_moment(hist).numpy(), left.numpy(), right.numpy(), count.numpy(), DST_BINS, prune.numpy()))
        losses = torch.where(dst_w < FLT_EPSILON, torch.zeros_like(losses), losses)
        losses = torch.where(valid, losses, torch.full_like(losses, float("inf")))
        best_loss = losses.min(1, keepdim=True).values
        best = (losses <= best_loss * (1 + TIE_RTOL)).to(torch.int8).argmax(1, keepdim=True)
        bl, br = left.gather(1, best)[:, 0], right.gather(1, best)[:, 0]
    else:
        bl, br = _solve_torch(hist, w, first_chunk)
    clip_min = lo + bl.to(torch.float32) * w
    clip_max = lo + (br + 1).to(torch.float32) * w
    return factors_from_clip(clip_max, clip_min, asymmetric)


def _solve_torch(hist: torch.Tensor, w: torch.Tensor, first_chunk: int):
    """The chosen candidate ``(left, right)`` ([C] each) of every channel on the torch path:
    what the compiled kernels choose, walking and evaluating only as far as needed.

    The walk (:func:`walk_chunk`) and the losses run together in chunks of candidates over
    the channels still in play, the first chunk ``first_chunk`` candidates long, each next
    one twice as long (a host read per chunk: about log2 of the longest walk). A channel
    leaves when its walk ends or when it is pruned as the compiled kernel prunes: every
    value outside a candidate's [L, R) costs at least its squared distance to that
    interval, a bound that only grows along the walk, so once it exceeds the best loss so
    far (by more than rounding) that candidate and every later one of the channel are
    skipped; they could not win. The kernel prunes a channel only where no candidate has
    its loss forced to zero (destination bins narrower than FLT_EPSILON), known only at
    the end of the walk; a channel where even a one-bin range is wide enough cannot have
    one, and only such channels are pruned on the way. The others walk to the end, and the
    same pruning is applied to their losses afterwards, so every channel's losses are the
    kernel's (inf where it skips), and the choice (the first loss within TIE_RTOL of the
    row's minimum) is made over the chunks in walk order."""
    c, bins = hist.shape
    dev = hist.device
    tab, m2 = loss_tables(hist)
    q0 = tab[0]
    m0 = q0[:, -1]
    step = walk_step_size(q0)
    min_bins = math.ceil(bins / 4)
    slack = 1e-9 * (m2 + m0 * bins * bins)
    inf = float("inf")
    sure = (w[:, None] * torch.ones(1, 1, device=dev) / DST_BINS >= FLT_EPSILON)[:, 0]
    left = torch.zeros(c, dtype=torch.int64, device=dev)
    right = torch.full((c,), bins - 1, dtype=torch.int64, device=dev)
    best = torch.full((c,), inf, dtype=torch.float64, device=dev)
    rows = None  # all channels, in order (no gather of their tables)
    parts = []
    chunk = max(1, first_chunk)
    while True:
        r_n = c if rows is None else rows.numel()
        steps = min(chunk, max(1, LOSS_CHUNK_ELEMENTS // max(1, r_n * DST_BINS)))
        sub = (lambda t: t) if rows is None else (lambda t: t[rows])
        lefts, rights, valid, nl, nr, ended = walk_chunk(sub(q0), sub(step), sub(left), sub(right), steps, min_bins)
        raw = hfmg_losses(hist, lefts, rights, (tab, m2), rows)
        raw = torch.where(valid, raw, torch.full_like(raw, inf))
        bound = _outside_bound(tab, m2, lefts, rights, rows)
        before = torch.minimum(sub(best)[:, None], torch.cat([
            torch.full_like(raw[:, :1], inf), torch.cummin(raw, 1).values[:, :-1]], 1))
        cut = sub(sure)[:, None] & valid & (bound > before + sub(slack)[:, None])
        cut = cut.to(torch.int8).cumsum(1) > 0  # the first pruned candidate and every later one
        part = torch.where(cut, torch.full_like(raw, inf), raw)
        all_rows = torch.arange(c, device=dev) if rows is None else rows
        best[all_rows] = torch.minimum(sub(best), part.min(1).values)
        left[all_rows], right[all_rows] = nl, nr
        parts.append((all_rows, lefts, rights, valid, raw, bound))
        rows = all_rows[~ended & ~cut.any(1)]
        if rows.numel() == 0:
            break
        chunk *= 2
    # the kernel's pruning switch, now that every unsure channel's walk is complete
    tiny_seen = torch.zeros(c, dtype=torch.int64, device=dev)
    for rows, lefts, rights, valid, _, _ in parts:
        tiny = (w[rows, None] * (rights - lefts + 1).to(torch.float32) / DST_BINS) < FLT_EPSILON
        tiny_seen.index_add_(0, rows, (tiny & valid).any(1).to(torch.int64))
    prune = tiny_seen == 0
    # the kernel's losses, chunk by chunk in walk order (the cut again: the same where pruned
    # on the way), and each row's minimum
    best = torch.full((c,), inf, dtype=torch.float64, device=dev)
    lowest = torch.full((c,), inf, dtype=torch.float64, device=dev)
    final = []
    for rows, lefts, rights, valid, raw, bound in parts:
        before = torch.minimum(best[rows, None], torch.cat([
            torch.full_like(raw[:, :1], inf), torch.cummin(raw, 1).values[:, :-1]], 1))
        cut = prune[rows, None] & valid & (bound > before + slack[rows, None])
        cut = cut.to(torch.int8).cumsum(1) > 0
        part = torch.where(cut, torch.full_like(raw, inf), raw)
        best[rows] = torch.minimum(best[rows], part.min(1).values)
        dst_w = w[rows, None] * (rights - lefts + 1).to(torch.float32) / DST_BINS
        losses = torch.where(dst_w < FLT_EPSILON, torch.zeros_like(part), part)
        losses = torch.where(valid, losses, torch.full_like(losses, inf))
        lowest[rows] = torch.minimum(lowest[rows], losses.min(1).values)
        final.append(losses)
    # the first candidate within the tie of the minimum (none: the first candidate, as argmax
    # of all-False); the earliest chunk with one wins, so the chunks are visited last to first
    bl, br = parts[0][1][:, 0].clone(), parts[0][2][:, 0].clone()
    for (rows, lefts, rights, _, _, _), losses in reversed(list(zip(parts, final))):
        hit = losses <= (lowest[rows] * (1 + TIE_RTOL))[:, None]
        first = hit.to(torch.int8).argmax(1, keepdim=True)
        has = hit.any(1)
        bl[rows] = torch.where(has, lefts.gather(1, first)[:, 0], bl[rows])
        br[rows] = torch.where(has, rights.gather(1, first)[:, 0], br[rows])
    return bl, br
