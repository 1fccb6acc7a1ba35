"""Compiled CPU kernels (numba) for the per-channel hot loops of IFMR and HFMG.

Parallel over channels. They compute exactly what the torch paths in ``ifmr.py`` and
``hfmg.py`` compute (same float32 rounding of scales, thresholds and levels; float64
sums) and are used for CPU tensors when numba is importable; the torch paths serve other
devices and are the fallback. ``tests/algorithms`` checks both paths agree.
"""
from __future__ import annotations

import math
import os

import numpy as np

__all__ = ["AVAILABLE", "use_kernels", "histc_rows", "ifmr_losses", "aligned_update", "hfmg_walk", "hfmg_losses"]

try:
    if os.environ.get("AMCT_HF_DISABLE_NUMBA"):
        raise ImportError("disabled by AMCT_HF_DISABLE_NUMBA")
    import numba
    from numba import njit, prange
    AVAILABLE = True
except ImportError:  # pragma: no cover - exercised by the fallback tests via the env switch
    AVAILABLE = False



def use_kernels(t) -> bool:
    """Whether the compiled kernels serve this tensor (CPU, numba present)."""
    return AVAILABLE and t.device.type == "cpu"


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
            p0 = np.empty(n + 1)
            p1 = np.empty(n + 1)
            p2 = np.empty(n + 1)
            p0[0] = 0.0
            p1[0] = 0.0
            p2[0] = 0.0
            for i in range(n):
                v = np.float64(x[c, i])
                wt = 1.0 if unit else w[c, i]
                p0[i + 1] = p0[i] + wt
                p1[i + 1] = p1[i] + wt * v
                p2[i + 1] = p2[i] + wt * v * v
            sum_sq[c] = p2[n]
            for r in range(r_n):
                s = scales[c, r]
                j = np.rint(np.float32(los[c, r] / s))
                j_hi = np.rint(np.float32(his[c, r] / s))
                start = 0
                total = 0.0
                crossed = 0.0  # values in histogram bins that a rounding threshold crosses
                while True:
                    if j < j_hi:
                        t = np.float32((j + half) * s)
                        end = _lower_bound(x[c], t, start)
                        if not unit:
                            width = math.ldexp(1.0, level[c])
                            k = np.int64(math.floor(np.float64(t) / width)) - origin[c]
                            if k >= 0 and k < n:
                                crossed += w[c, k]
                    else:
                        end = n
                    q = np.float64(np.float32(j * s))
                    val = ((p0[end] - p0[start]) * q * q - 2.0 * q * (p1[end] - p1[start])
                           + (p2[end] - p2[start]))
                    if val > 0.0:
                        total += val
                    if end == n or j >= j_hi:
                        break
                    start = end
                    j += np.float32(1.0)
                out[c, r] = total
                if not unit:
                    eps = 2.0 * np.float64(s) * math.ldexp(1.0, level[c]) * crossed
                    if 2.0 * eps > tol[c]:
                        tol[c] = 2.0 * eps
        return out, sum_sq, tol

    @njit(parallel=True, cache=True)
    def _aligned_update(x, level, origin, counts, offsets):
        n, c_n = x.shape
        b_n = counts.shape[1]
        for c in prange(c_n):
            w = math.ldexp(1.0, level[c])
            for i in range(n):
                v = np.float64(x[i, c])
                a = np.int64(math.floor(v / w))
                k = a - origin[c]
                if k < 0:
                    k = 0
                elif k >= b_n:
                    k = b_n - 1
                counts[c, k] += 1.0
                offsets[c, k] += v - (a + 0.5) * w

    def aligned_update(x, level, origin, counts, offsets):
        """Add x [N, C] to an aligned histogram in place (see aligned.py)."""
        _aligned_update(x, level, origin, counts, offsets)

    @njit(parallel=True, cache=True)
    def _hfmg_walk(hist, min_bins):
        c_n, bins = hist.shape
        left_out = np.zeros((c_n, bins), dtype=np.int64)
        right_out = np.zeros((c_n, bins), dtype=np.int64)
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
        return left_out, right_out, count

    @njit(parallel=True, cache=True)
    def _hfmg_losses(q0, q1, h, m0, m1, m2, left, right, count, dst_bins):
        c_n, k_n = left.shape
        bins = q0.shape[1] - 1
        shift = bins / 2.0
        out = np.full((c_n, k_n), np.inf)
        for c in prange(c_n):
            for k in range(count[c]):
                L = left[c, k] - shift
                D = (right[c, k] - left[c, k] + 1) / dst_bins
                acc = 0.0
                for e in range(1, dst_bins):
                    p = L + e * D
                    f = math.floor(p)
                    r = p - f
                    i = int(f + shift)
                    acc += q1[c, i] - p * q0[c, i] - 0.5 * h[c, i] * r * r
                c255 = L + (dst_bins - 0.5) * D
                out[c, k] = m2[c] - 2.0 * c255 * m1[c] + c255 * c255 * m0[c] + 2.0 * D * acc
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

    def hfmg_losses(q0, q1, h, m0, m1, m2, left, right, count, dst_bins):
        return _hfmg_losses(q0, q1, h, m0, m1, m2, left, right, count, dst_bins)
