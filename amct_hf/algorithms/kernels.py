"""Compiled CPU kernels (numba) for the per-channel hot loops of IFMR and HFMG.

Parallel over channels. They compute exactly what the torch paths in ``ifmr.py`` and
``hfmg.py`` compute (same float32 rounding of scales, thresholds and levels; float64
sums) and are used for CPU tensors when numba is importable; the torch paths serve other
devices and are the fallback. ``tests/algorithms`` checks both paths agree.
"""
from __future__ import annotations

import contextlib
import math
import os

import numpy as np

__all__ = ["AVAILABLE", "Override", "use_kernels", "torch_path", "forced_torch_path", "histc_rows", "ifmr_losses",
           "aligned_update", "aligned_update_columns", "row_ranges", "aligned_regrid", "aligned_cumulative",
           "aligned_resample", "aligned_means", "hfmg_walk", "hfmg_losses"]

try:
    if os.environ.get("AMCT_HF_DISABLE_NUMBA"):
        raise ImportError("disabled by AMCT_HF_DISABLE_NUMBA")
    import numba
    from numba import njit, prange
    AVAILABLE = True
except ImportError:  # pragma: no cover - exercised by the fallback tests via the env switch
    AVAILABLE = False



class Override:
    """A process-wide choice of code path, which a ``with override(enabled):`` block sets and
    the block's end restores."""

    def __init__(self, value: bool | None):
        self.value = value

    @contextlib.contextmanager
    def __call__(self, enabled: bool = True):
        before, self.value = self.value, bool(enabled)
        try:
            yield
        finally:
            self.value = before


# Set by torch_path() (or AMCT_HF_FORCE_TORCH_PATH=1): CPU tensors take the device
# (torch) code too, so that code is exercised and checked on machines without an accelerator.
_TORCH_PATH = Override(bool(os.environ.get("AMCT_HF_FORCE_TORCH_PATH")))


def use_kernels(t) -> bool:
    """Whether the compiled kernels serve this tensor (CPU, numba present, torch path not forced)."""
    return AVAILABLE and not _TORCH_PATH.value and t.device.type == "cpu"


def forced_torch_path() -> bool:
    return _TORCH_PATH.value


def torch_path(enabled: bool = True):
    """Within the block, CPU tensors take the torch (accelerator) path instead of the kernels."""
    return _TORCH_PATH(enabled)


if AVAILABLE:

    @njit(cache=True, inline="always")
    def _lower_bound(x, t, lo):
        hi = x.shape[0]
        while lo < hi:
            mid = (lo + hi) >> 1
            if x[mid] < t:
                lo = mid + 1
            else:
                hi = mid
        return lo

    @njit(parallel=True, cache=True)
    def _ifmr_losses(x, w, unit, his, los, scales, level, origin):
        # x [C, N] sorted rows (float32 values, or float64 bin means with weights w of an
        # aligned histogram with the given level/origin, whose tolerance is also returned)
        c_n, n = x.shape
        r_n = scales.shape[1]
        out = np.empty((c_n, r_n), dtype=np.float64)
        sum_sq = np.empty(c_n, dtype=np.float64)
        tol = np.zeros(c_n, dtype=np.float64)
        half = np.float32(0.5)
        for c in prange(c_n):
            xc = x[c]
            # the three prefix sums side by side: a bucket's end reads one row
            prefix = np.empty((n + 1, 3))
            a0 = 0.0
            a1 = 0.0
            a2 = 0.0
            prefix[0, 0] = 0.0
            prefix[0, 1] = 0.0
            prefix[0, 2] = 0.0
            for i in range(n):
                v = np.float64(xc[i])
                wt = 1.0 if unit else w[c, i]
                a0 += wt
                a1 += wt * v
                a2 += wt * v * v
                prefix[i + 1, 0] = a0
                prefix[i + 1, 1] = a1
                prefix[i + 1, 2] = a2
            sum_sq[c] = a2
            inv_w = 1.0
            org = 0
            if not unit:
                inv_w = math.ldexp(1.0, -level[c])  # exact: a power of two
                org = origin[c]
            tol_c = 0.0
            for r in range(r_n):
                s = scales[c, r]
                j = np.rint(np.float32(los[c, r] / s))
                j_hi = np.rint(np.float32(his[c, r] / s))
                start = 0
                # the previous bucket's end row, carried instead of read again
                b0 = 0.0
                b1 = 0.0
                b2 = 0.0
                total = 0.0
                crossed = 0.0  # values in histogram bins that a rounding threshold crosses
                while True:
                    if j < j_hi:
                        t = np.float32((j + half) * s)
                        if unit:
                            end = _lower_bound(xc, t, start)
                        else:
                            # bin means lie inside their aligned bins: only the bin holding t
                            # needs a comparison (same answer as the binary search)
                            k = np.int64(math.floor(np.float64(t) * inv_w)) - org
                            if k < 0:
                                end = 0
                            elif k >= n:
                                end = n
                            else:
                                crossed += w[c, k]
                                end = k + (xc[k] < t)
                            end = max(end, start)
                    else:
                        end = n
                    e0 = prefix[end, 0]
                    e1 = prefix[end, 1]
                    e2 = prefix[end, 2]
                    q = np.float64(np.float32(j * s))
                    # max(): float rounding can leave a bucket's exact zero slightly negative
                    total += max((e0 - b0) * q * q - 2.0 * q * (e1 - b1) + (e2 - b2), 0.0)
                    if end == n or j >= j_hi:
                        break
                    start = end
                    b0 = e0
                    b1 = e1
                    b2 = e2
                    j += np.float32(1.0)
                out[c, r] = total
                if not unit:
                    eps = 2.0 * np.float64(s) * math.ldexp(1.0, level[c]) * crossed
                    tol_c = max(tol_c, 2.0 * eps)
            tol[c] = tol_c
        return out, sum_sq, tol

    @njit(cache=True, inline="always")
    def _insert_descending(buf, xv):
        # buf sorted descending, xv > buf[-1]: shift the smaller ones down, drop the last
        j = buf.shape[0] - 1
        while j > 0 and buf[j - 1] < xv:
            buf[j] = buf[j - 1]
            j -= 1
        buf[j] = xv

    @njit(cache=True, inline="always")
    def _insert_ascending(buf, xv):
        j = buf.shape[0] - 1
        while j > 0 and buf[j - 1] > xv:
            buf[j] = buf[j - 1]
            j -= 1
        buf[j] = xv

    @njit(cache=True)
    def _update_row(row, level, origin, counts, offsets, top, bottom, track, extremes):
        # one channel: the values of row into counts/offsets [B], extremes into top/bottom [K]
        b_n = counts.shape[0]
        w = math.ldexp(1.0, level)
        inv_w = math.ldexp(1.0, -level)  # exact: multiplying equals dividing by w
        for i in range(row.shape[0]):
            v = np.float64(row[i])
            a = np.int64(math.floor(v * inv_w))
            k = a - origin
            if k < 0:
                k = 0
            elif k >= b_n:
                k = b_n - 1
            counts[k] += 1.0
            if track:
                offsets[k] += v - (a + 0.5) * w
        if extremes:
            _update_extremes(row, top, bottom)

    # values per block of the extremes pass: one compare pair per block decides
    _EXTREME_BLOCK = 32

    @njit(cache=True, fastmath={"nnan", "ninf", "nsz"})
    def _block_range(row, start, stop):
        # finite values only (the bank checks every activation): min/max vectorize then
        lo = row[start]
        hi = row[start]
        for i in range(start + 1, stop):
            lo = min(lo, row[i])
            hi = max(hi, row[i])
        return lo, hi

    @njit(cache=True)
    def _update_extremes(row, top, bottom):
        # A separate pass: in the histogram loop the two compares cost as much as the bin
        # update. The admission thresholds only rise (fall), so a block whose range lies
        # within them holds nothing to admit; the buffers end as with a value-by-value scan.
        k_n = top.shape[0]
        top_min = top[k_n - 1]
        bottom_max = bottom[k_n - 1]
        n = row.shape[0]
        for start in range(0, n, _EXTREME_BLOCK):
            stop = min(n, start + _EXTREME_BLOCK)
            lo, hi = _block_range(row, start, stop)
            if hi <= top_min and lo >= bottom_max:
                continue
            for i in range(start, stop):
                xv = row[i]
                if xv > top_min:
                    _insert_descending(top, xv)
                    top_min = top[k_n - 1]
                if xv < bottom_max:
                    _insert_ascending(bottom, xv)
                    bottom_max = bottom[k_n - 1]

    @njit(parallel=True, cache=True, fastmath={"nnan", "ninf", "nsz"})
    def _row_ranges(x, n):
        c_n = x.shape[0]
        lo = np.empty(c_n, dtype=x.dtype)
        hi = np.empty(c_n, dtype=x.dtype)
        for c in prange(c_n):
            lo[c], hi[c] = _block_range(x[c], 0, n)
        return lo, hi

    def row_ranges(x, n):
        """(min, max) of ``x[c, :n]`` per row, for finite values (n >= 1)."""
        return _row_ranges(x, n)

    @njit(cache=True)
    def _warm(counts, offsets, track):
        # one load per cache line, in address order: the hardware prefetcher streams the
        # channel's histogram in, where the update's scattered loads would each miss
        acc = 0.0
        for k in range(0, counts.shape[0], 8):
            acc += counts[k]
            if track:
                acc += offsets[k]
        return acc

    @njit(parallel=True, cache=True)
    def _aligned_update(x, level, origin, counts, offsets, top, bottom, extremes):
        # x is [C, N] (channel-major, so each thread streams through its own rows)
        track = offsets.shape[1] > 0
        warmed = np.empty(x.shape[0])  # kept so the warming loads are not optimised away
        for c in prange(x.shape[0]):
            warmed[c] = _warm(counts[c], offsets[c], track)
            _update_row(x[c], level[c], origin[c], counts[c], offsets[c],
                        top[c], bottom[c], track, extremes)
        return warmed

    @njit(parallel=True, cache=True)
    def _aligned_update_split(x, level, origin, counts, offsets, top, bottom, extremes, parts):
        # one channel (per-tensor) over ``parts`` threads: each fills a private histogram
        # and extreme buffers from a slice of the values, merged afterwards. Counts and
        # extremes are those of one thread exactly; offsets are float64 sums regrouped, as
        # when processes' histograms are summed.
        n = x.shape[1]
        b_n = counts.shape[1]
        k_n = top.shape[1]
        track = offsets.shape[1] > 0
        part_counts = np.zeros((parts, b_n))
        part_offsets = np.zeros((parts, b_n if track else 0))
        part_top = np.full((parts, k_n), -np.inf, dtype=top.dtype)
        part_bottom = np.full((parts, k_n), np.inf, dtype=bottom.dtype)
        block = (n + parts - 1) // parts
        for p in prange(parts):
            lo = min(n, p * block)
            hi = min(n, lo + block)
            if extremes:  # admit only what can enter the merged buffers: the merge takes
                # strictly greater (smaller) values, so these placeholders never enter
                part_top[p, :] = top[0, k_n - 1]
                part_bottom[p, :] = bottom[0, k_n - 1]
            _update_row(x[0, lo:hi], level[0], origin[0], part_counts[p],
                        part_offsets[p], part_top[p], part_bottom[p],
                        track, extremes)
        for p in range(parts):
            counts[0] += part_counts[p]
            if track:
                offsets[0] += part_offsets[p]
            if extremes:
                for i in range(k_n):
                    xv = part_top[p, i]
                    if xv > top[0, k_n - 1]:
                        _insert_descending(top[0], xv)
                    xv = part_bottom[p, i]
                    if xv < bottom[0, k_n - 1]:
                        _insert_ascending(bottom[0], xv)

    def aligned_update(x, level, origin, counts, offsets, top=None, bottom=None):
        """Add x [N, C] to an aligned histogram in place (see aligned.py); optionally keep
        the per-channel top/bottom buffers ([C, K], sorted) of the largest/smallest values."""
        aligned_update_columns(np.ascontiguousarray(x.T), level, origin, counts, offsets, top, bottom)

    # below this many values a single channel is not worth splitting between threads
    _SPLIT_MIN_VALUES = 1 << 16

    def aligned_update_columns(xt, level, origin, counts, offsets, top=None, bottom=None):
        """``aligned_update`` of a channel-major batch xt [C, N] (rows may be strided)."""
        extremes = top is not None
        if not extremes:
            top = bottom = np.empty((xt.shape[0], 1), dtype=xt.dtype)
        threads = numba.get_num_threads()
        if xt.shape[0] == 1 and threads > 1 and xt.shape[1] >= _SPLIT_MIN_VALUES:
            _aligned_update_split(xt, level, origin, counts, offsets, top, bottom, extremes, threads)
        else:
            _aligned_update(xt, level, origin, counts, offsets, top, bottom, extremes)

    @njit(parallel=True, cache=True)
    def _aligned_regrid(level, origin, new_level, new_origin, counts, offsets):
        c_n, b_n = counts.shape
        track = offsets.shape[1] > 0
        for c in prange(c_n):
            if new_level[c] == level[c] and new_origin[c] == origin[c]:
                continue
            shift = min(new_level[c] - level[c], 63)
            old_w = math.ldexp(1.0, level[c])
            new_w = math.ldexp(1.0, new_level[c])
            cnt = np.zeros(b_n)
            off = np.zeros(b_n)
            for k in range(b_n):
                a = origin[c] + k
                na = a >> shift
                nk = na - new_origin[c]
                if nk < 0:
                    nk = 0
                elif nk >= b_n:
                    nk = b_n - 1
                m = counts[c, k]
                cnt[nk] += m
                if track:
                    off[nk] += offsets[c, k] + m * ((a + 0.5) * old_w - (na + 0.5) * new_w)
            counts[c, :] = cnt
            if track:
                offsets[c, :] = off

    def aligned_regrid(level, origin, new_level, new_origin, counts, offsets):
        """Move the channels whose grid changed, in place."""
        _aligned_regrid(level, origin, new_level, new_origin, counts, offsets)

    @njit(cache=True, inline="always")
    def _prefix_of(counts, prefix):
        prefix[0] = 0.0
        for k in range(counts.shape[0]):
            prefix[k + 1] = prefix[k] + counts[k]

    @njit(cache=True, inline="always")
    def _count_below(counts, prefix, w, inv_w, origin, lo_c, hi_c, v):
        # values below v, spread uniformly over each bin's data span
        b_n = counts.shape[0]
        if v >= hi_c:
            return prefix[b_n]
        if v < lo_c:
            return 0.0
        k = np.int64(math.floor(v * inv_w)) - origin
        if k < 0:
            k = 0
        elif k >= b_n:
            k = b_n - 1
        edge = (origin + k) * w
        left = max(edge, lo_c)
        right = min(edge + w, hi_c)
        frac = (v - left) / (right - left)
        if frac != frac:
            frac = 1.0
        frac = min(max(frac, 0.0), 1.0)
        return prefix[k] + counts[k] * frac

    @njit(parallel=True, cache=True)
    def _aligned_cumulative(counts, level, origin, lo, hi, x):
        c_n, b_n = counts.shape
        m_n = x.shape[1]
        out = np.empty((c_n, m_n))
        for c in prange(c_n):
            prefix = np.empty(b_n + 1)
            _prefix_of(counts[c], prefix)
            w = math.ldexp(1.0, level[c])
            inv_w = math.ldexp(1.0, -level[c])
            lo_c, hi_c = np.float64(lo[c]), np.float64(hi[c])
            for m in range(m_n):
                out[c, m] = _count_below(counts[c], prefix, w, inv_w, origin[c], lo_c, hi_c, x[c, m])
        return out

    @njit(parallel=True, cache=True)
    def _aligned_resample(counts, level, origin, lo, hi, bins):
        # the cumulative count at lo + k * (hi - lo) / bins, differenced: one pass per
        # channel instead of [C, bins + 1] temporaries
        c_n, b_n = counts.shape
        out = np.zeros((c_n, bins))
        for c in prange(c_n):
            prefix = np.empty(b_n + 1)
            _prefix_of(counts[c], prefix)
            lo_c, hi_c = np.float64(lo[c]), np.float64(hi[c])
            if lo_c == hi_c:  # as torch.histc: a constant channel lands in the middle bin
                total = 0.0
                for k in range(b_n):
                    total += counts[c, k]
                out[c, bins // 2] = total
                continue
            w = math.ldexp(1.0, level[c])
            inv_w = math.ldexp(1.0, -level[c])
            step = (hi_c - lo_c) / bins
            below = _count_below(counts[c], prefix, w, inv_w, origin[c], lo_c, hi_c, lo_c)
            for k in range(bins):
                edge = lo_c + step * np.float64(k + 1)
                above = _count_below(counts[c], prefix, w, inv_w, origin[c], lo_c, hi_c, edge)
                out[c, k] = above - below
                below = above
        return out

    def aligned_resample(counts, level, origin, lo, hi, bins):
        """Counts of an aligned histogram on ``bins`` equal bins over [lo, hi] per channel
        (uniform within each fine bin): ``cumulative_at`` of the edges, differenced."""
        return _aligned_resample(counts, level, origin, lo, hi, bins)

    @njit(parallel=True, cache=True)
    def _aligned_means(counts, offsets, level, origin):
        c_n, b = counts.shape
        out = np.empty((c_n, b), dtype=np.float64)
        for c in prange(c_n):
            w = math.ldexp(1.0, level[c])
            for i in range(b):
                centre = np.float64(origin[c] + i) * w + 0.5 * w
                n = counts[c, i]
                out[c, i] = centre + (offsets[c, i] / n if n > 0 else 0.0)
        return out

    def aligned_means(counts, offsets, level, origin):
        """``AlignedHistogram.means`` (see aligned.py) in one pass, bit for bit."""
        return _aligned_means(counts, offsets, level, origin)

    def aligned_cumulative(counts, level, origin, lo, hi, x):
        """``AlignedHistogram.cumulative_at`` (see aligned.py): [C, M] counts below x."""
        return _aligned_cumulative(counts, level, origin, lo, hi, x)

    @njit(parallel=True, cache=True)
    def _hfmg_walk(hist, min_bins):
        c_n, bins = hist.shape
        # [C, bins] would be 2 x 6 MB of fresh pages per 192 channels; walks are far shorter
        # than bins, and only the pages they write are touched
        left_out = np.empty((c_n, bins), dtype=np.int64)
        right_out = np.empty((c_n, bins), dtype=np.int64)
        count = np.zeros(c_n, dtype=np.int64)
        for c in prange(c_n):
            total = 0.0
            for i in range(bins):
                total += hist[c, i]
            step = max(math.ceil(total / 100000.0), 1.0)
            left, right, k = 0, bins - 1, 0
            while right - left > min_bins:
                tl, tr, ls, rs = left, right, 0.0, 0.0
                while tl < tr and ls < step:
                    ls += hist[c, tl]
                    tl += 1
                while tl < tr and rs < step:
                    rs += hist[c, tr]
                    tr -= 1
                if right - tr >= tl - left:
                    right = tr
                else:
                    left = tl
                left_out[c, k] = left
                right_out[c, k] = right
                k += 1
            count[c] = k
        k_n = max(1, count.max())
        left_trim = np.empty((c_n, k_n), dtype=np.int64)
        right_trim = np.empty((c_n, k_n), dtype=np.int64)
        for c in prange(c_n):
            for k in range(k_n):  # past a channel's walk: its first range (or the whole)
                src = k if k < count[c] else 0
                left_trim[c, k] = left_out[c, src] if count[c] else 0
                right_trim[c, k] = right_out[c, src] if count[c] else bins - 1
        return left_trim, right_trim, count

    @njit(parallel=True, cache=True)
    def _hfmg_losses(hist, m2, left, right, count, dst_bins, prune):
        c_n, k_n = left.shape
        bins = hist.shape[1]
        shift = bins / 2.0
        out = np.full((c_n, k_n), np.inf)
        for c in prange(c_n):
            # one interleaved table per channel: the loads of an edge share a cache line.
            # Columns 0/1 are loss_tables' q0/q1 (torch's cumsum is this sequential sum)
            tab = np.empty((bins + 1, 4))
            q0 = 0.0
            q1 = 0.0
            q2 = 0.0
            for i in range(bins + 1):
                h = hist[c, i] if i < bins else 0.0
                tab[i, 0] = q0
                tab[i, 1] = q1
                tab[i, 2] = 0.5 * h
                tab[i, 3] = q2  # second moment of the bins below i (uniform within a bin)
                if i < bins:
                    u = i - shift
                    q0 += h
                    q1 += h * (u + 0.5)
                    q2 += h * (u * u + u + 1.0 / 3.0)
            m0, m1 = q0, q1  # loss_tables' m0/m1: the last prefix sums
            # Every value outside [L, R) costs at least its squared distance to that interval
            # (it is quantized to an edge bin's centre, further inside). The walk only ever
            # narrows the interval, so this bound never decreases: once it exceeds the best
            # loss so far (by far more than rounding), no later candidate can win.
            slack = 1e-9 * (m2[c] + m0 * bins * bins)
            best = np.inf
            inv = 1.0 / dst_bins
            for k in range(count[c]):
                L = left[c, k] - shift
                if prune[c]:
                    R = right[c, k] + 1 - shift
                    a, b = left[c, k], right[c, k] + 1
                    below = L * L * tab[a, 0] - 2.0 * L * tab[a, 1] + tab[a, 3]
                    above = (R * R * (m0 - tab[b, 0]) - 2.0 * R * (m1 - tab[b, 1])
                             + (m2[c] - tab[b, 3]))
                    if below + above > best + slack:
                        break
                n = right[c, k] - left[c, k] + 1
                D = n / dst_bins
                acc = 0.0
                # edges in units of 1/dst_bins of a source bin: integers, so the bin index
                # and the fraction come without floor() (dst_bins is a power of two)
                pos = left[c, k] * dst_bins
                for e in range(1, dst_bins):
                    pos += n
                    i = pos // dst_bins
                    r = (pos - i * dst_bins) * inv
                    p = pos * inv - shift
                    acc += tab[i, 1] - p * tab[i, 0] - tab[i, 2] * r * r
                c255 = L + (dst_bins - 0.5) * D
                loss = m2[c] - 2.0 * c255 * m1 + c255 * c255 * m0 + 2.0 * D * acc
                out[c, k] = loss
                if loss < best:
                    best = loss
        return out

    @njit(parallel=True, cache=True)
    def _histc_rows(x, lo, hi, bins, n_blocks):
        # x [N, C]; per-block partial histograms, summed at the end (no atomics)
        n, c_n = x.shape
        part = np.zeros((n_blocks, c_n, bins), dtype=np.float64)
        fb = np.float32(bins)
        block = (n + n_blocks - 1) // n_blocks
        for b in prange(n_blocks):
            for i in range(b * block, min(n, (b + 1) * block)):
                for c in range(c_n):
                    v = x[i, c]
                    if v >= lo[c] and v <= hi[c]:
                        pos = np.int64(((v - lo[c]) * fb) / (hi[c] - lo[c]))
                        if pos >= bins:
                            pos = bins - 1
                        part[b, c, pos] += 1.0
        return part.sum(axis=0)

    def histc_rows(x, lo, hi, bins):
        """torch.histc of every column of x [N, C] on [lo[c], hi[c]] (lo < hi), float64 [C, bins]."""
        n_blocks = max(1, min(numba.get_num_threads() * 2, x.shape[0]))
        return _histc_rows(x, lo, hi, bins, n_blocks)

    def ifmr_losses(sorted_x, his, los, scales, weights=None, grid=None):
        """([C, R] float64 losses, [C] sum of squares) for values sorted along rows; or, for
        the bin means of an aligned histogram with ``weights`` = counts and ``grid`` =
        (level, origin), also the per-channel tolerance of ``StreamingIFMRObserver``."""
        dummy = np.zeros(sorted_x.shape[0], dtype=np.int64)
        if weights is None:
            return _ifmr_losses(sorted_x, np.empty((1, 1)), True, his, los, scales, dummy, dummy)[:2]
        return _ifmr_losses(sorted_x, weights, False, his, los, scales, *grid)

    def hfmg_walk(hist, min_bins):
        return _hfmg_walk(hist, min_bins)

    def hfmg_losses(hist, m2, left, right, count, dst_bins, prune=None):
        """Losses of the walk's candidates ([C, K]) from the histogram [C, bins] and its
        second moment ``m2`` (``loss_tables``); where ``prune[c]``, candidates that provably cannot beat
        the best one are left at +inf (the walk stops early)."""
        if prune is None:
            prune = np.zeros(left.shape[0], dtype=np.bool_)
        return _hfmg_losses(hist, m2, left, right, count, dst_bins, prune)
