"""Fused device kernels (Triton) for the aligned histogram's per-value passes and solves.

Written as separate torch operations, counting a batch on the grid costs about 60 bytes of
memory traffic per value (the quotient, the bin and its clamps, an int64 index, then the
scatter), and about 110 with the per-bin offsets: a pass over the whole batch per
operation. One kernel reads each value once, computes its bin (and its offset from the bin
centre) in registers and adds it to the table: about 2 bytes per bfloat16 value read, plus
the table entries hit. The same holds for the grid move of per-channel tables: the torch
path rewrites every row of a [C, bins] table whenever the range may have moved (deciding
would read device values back); the move kernel leaves a row untouched unless its level or
origin changed, so once the ranges settle it reads only the [C] grids. Two solve steps
that the torch path spells as [channels x candidates x buckets] temporaries run as one
kernel each: the resample of the fine histogram onto HFMG's bins, and IFMR's loss of every
candidate.

Each is a torch operator (``amct_hf::count_on_grid``, ``move_rows``, ``cumulative_at_edges``,
``ifmr_bucket_losses``) with a shape-only implementation, so a ``TorchDispatchMode`` sees
one operation and the ``meta`` device can count it. On CUDA they run the compiled Triton
kernels; on CPU tensors (tests, :func:`fused_path`) the same kernel source runs in Triton's
interpreter, so CI checks the code a GPU runs. Without Triton (or with
``AMCT_HF_DISABLE_FUSED=1``) the torch operations serve every device;
``AMCT_HF_FORCE_FUSED=1`` makes every device take the fused kernels (CPU tensors: the
interpreter), as :func:`fused_path` does.

The arithmetic is that of the torch path and the CPU kernels, value for value: ``x *
2**-level`` is exact (a power-of-two scaling; a quotient that underflows can only belong to
``floor`` 0 or -1, decided by the sign bit), the bin relative to the origin is a float32
integer difference below ``bins`` (exact), NaN and infinities (data the NaN/Inf check
rejects) go to an end bin, the offset ``x - (q + 1/2) * 2**level`` takes the same two
float64 roundings; no multiply-add is contracted and divisions are IEEE-rounded. Counts are
exact; float64 sums may differ in the last bits (atomic addition order, a tree instead of a
running sum), as two runs on one GPU may.
"""
from __future__ import annotations

import contextlib
import os

import torch

from .ifmr import clip_buckets, prefix_sums
from .kernels import Override

__all__ = ["AVAILABLE", "use_fused", "fused_path", "count_on_grid", "move_rows", "resample", "ifmr_losses",
           "MOVE_MAX_BINS"]

try:
    if os.environ.get("AMCT_HF_DISABLE_FUSED"):
        raise ImportError("disabled by AMCT_HF_DISABLE_FUSED")
    if not hasattr(torch.library, "custom_op"):
        raise ImportError("torch.library.custom_op needs torch >= 2.4")
    import triton
    import triton.language as tl
    AVAILABLE = True
except ImportError:
    AVAILABLE = False

#: a per-row grid move keeps a whole row in one program's registers; longer rows (the
#: per-tensor tables: few rows, small tables) keep the torch move
MOVE_MAX_BINS = 4096

# Set by fused_path() (or AMCT_HF_FORCE_FUSED=1, for processes started by a test): every
# device takes the fused kernels, CPU tensors through Triton's interpreter; None: CUDA only
_FUSED = Override(True if os.environ.get("AMCT_HF_FORCE_FUSED") else None)


def use_fused(t: torch.Tensor) -> bool:
    """Whether the fused kernels serve this tensor: CUDA with Triton, or any device inside
    :func:`fused_path` (CPU: the interpreter; meta: counted, not run)."""
    if not AVAILABLE:
        return False
    if _FUSED.value is not None:
        return _FUSED.value
    return t.device.type == "cuda"


def fused_path(enabled: bool = True):
    """Within the block the fused kernels serve (``enabled``) or do not serve every device."""
    return _FUSED(enabled)


def count_on_grid(x: torch.Tensor, inverse: torch.Tensor, origin: torch.Tensor, width: torch.Tensor,
                  counts: torch.Tensor, offsets: torch.Tensor) -> None:
    """Add a [N, C] batch to ``counts`` ([C, bins] int32 or int64; and its offsets from the bin
    centres to ``offsets`` [C, bins] float64 unless that has no columns), on the grid of
    every column: ``inverse`` = 2**-level (float32, exact), ``origin`` (float32 integers) and
    ``width`` = 2**level (float64), each [C]. The grid must cover the batch's range."""
    _check_tables(counts, offsets, x.shape[1])
    torch.ops.amct_hf.count_on_grid(x, inverse, origin, width, counts, offsets)


def move_rows(counts: torch.Tensor, offsets: torch.Tensor, level: torch.Tensor, origin: torch.Tensor,
              new_level: torch.Tensor, new_origin: torch.Tensor, width: torch.Tensor,
              new_width: torch.Tensor) -> None:
    """Move every row of ``counts``/``offsets`` (in place) from its grid (``level``,
    ``origin``: int64 [C]; ``width`` = 2**level, float64) to the coarser or equal new one, as
    :meth:`AlignedHistogram.regrid` does; a row whose grid is unchanged is not touched. Rows
    of at most :data:`MOVE_MAX_BINS` bins."""
    _check_tables(counts, offsets, level.shape[0])
    torch.ops.amct_hf.move_rows(counts, offsets, level, origin, new_level, new_origin, width, new_width)


def resample(counts: torch.Tensor, width: torch.Tensor, inverse: torch.Tensor, origin: torch.Tensor,
             lo: torch.Tensor, hi: torch.Tensor, bins: int) -> torch.Tensor:
    """:meth:`AlignedHistogram.resample` of the rows of ``counts`` ([C, fine bins]; grid:
    ``width`` = 2**level and ``inverse`` = 2**-level, float64, ``origin`` int64; range ``lo``,
    ``hi``): the counts on ``bins`` equal bins over [lo, hi] per row ([C, bins] float64),
    each fine bin spread uniformly over its data span, a constant row in the middle bin. One
    kernel writes the cumulative count at every edge with the compiled CPU kernel's float64
    operations in its order; their differences are the CPU's bit for bit."""
    counts = counts.double().contiguous()
    prefix = torch.nn.functional.pad(counts.cumsum(1), (1, 0))  # exact: integer sums below 2**53
    below = torch.empty(counts.shape[0], bins + 1, dtype=torch.float64, device=counts.device)
    torch.ops.amct_hf.cumulative_at_edges(counts, prefix, width, inverse, origin, lo.double(), hi.double(), below)
    return below.diff(dim=1)


def ifmr_losses(points: torch.Tensor, weights: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor,
                scales: torch.Tensor, inverse: torch.Tensor, origin: torch.Tensor):
    """IFMR's loss of every candidate on an aligned histogram, one program per channel and
    candidate: ``points`` are the bin means ([C, n] float64, non-decreasing), ``weights`` the
    counts, ``hi``/``lo``/``scales`` the candidates ([C, R] float32), ``inverse`` = 2**-level
    (float64) and ``origin`` the grid ([C]). Returns ([C, R] losses, [C] sum of squares, [C, R]
    values in the bins a rounding threshold crosses -- the tolerance's count), with the
    compiled CPU kernel's per-bucket arithmetic; the buckets' sum is a tree instead of a
    running sum (the losses agree to rounding, the counts exactly)."""
    prefix = prefix_sums(points, weights)
    c, r = scales.shape
    losses = torch.empty(c, r, dtype=torch.float64, device=points.device)
    crossed = torch.empty_like(losses)
    if c and r:
        # buckets per candidate: the clip ends' rounded quotients (one read for the solve)
        buckets = clip_buckets(hi, lo, scales)[2]
        torch.ops.amct_hf.ifmr_bucket_losses(points.contiguous(), weights.double().contiguous(), *prefix,
                                             hi.contiguous(), lo.contiguous(), scales.contiguous(), inverse,
                                             origin, losses, crossed, max(1, buckets))
    return losses, prefix[2][:, -1], crossed


def _check_tables(counts: torch.Tensor, offsets: torch.Tensor, rows: int) -> None:
    # the kernels address row r, bin b at r * bins + b
    if counts.dtype not in (torch.int32, torch.int64) or counts.shape[0] != rows or not counts.is_contiguous():
        raise ValueError(f"counts must be a contiguous int32/int64 [{rows}, bins] table, not {counts.dtype} "
                         f"{list(counts.shape)} (contiguous: {counts.is_contiguous()})")
    if offsets.numel() and (offsets.shape != counts.shape or not offsets.is_contiguous()
                            or offsets.dtype != torch.float64):
        raise ValueError(f"offsets must be a contiguous float64 table shaped as the counts, not {offsets.dtype} "
                         f"{list(offsets.shape)}")


if AVAILABLE:

    def _count_kernel(x_ptr, stride_n, stride_c, n, c, inverse_ptr, origin_ptr, width_ptr, counts_ptr,
                      offsets_ptr, bins,
                      WITH_OFFSETS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < c
        inverse = tl.load(inverse_ptr + cols, mask=col_ok, other=1.0)
        origin = tl.load(origin_ptr + cols, mask=col_ok, other=0.0)
        ok = (rows[:, None] < n) & col_ok[None, :]
        where = rows[:, None].to(tl.int64) * stride_n + cols[None, :].to(tl.int64) * stride_c
        raw = tl.load(x_ptr + where, mask=ok, other=0.0)
        x = raw.to(tl.float32)
        q = tl.floor(x * inverse[None, :])
        # a negative value whose quotient underflowed (or was flushed) to zero is in bin -1;
        # its sign is read from the stored bits, which no flush of a subnormal changes
        if raw.dtype.primitive_bitwidth == 16:
            bits = raw.to(tl.int16, bitcast=True).to(tl.int32)
            magnitude = bits & 0x7FFF
        else:
            bits = raw.to(tl.int32, bitcast=True)
            magnitude = bits & 0x7FFFFFFF
        q = tl.where((bits < 0) & (magnitude != 0) & (q > -1.0), -1.0, q)
        rel = q - origin[None, :]
        rel = tl.where(rel == rel, rel, 0.0)
        rel = tl.minimum(tl.maximum(rel, 0.0), bins - 1.0)
        slot = cols[None, :].to(tl.int64) * bins + rel.to(tl.int64)
        one = tl.full((BLOCK_N, BLOCK_C), 1, counts_ptr.dtype.element_ty)
        tl.atomic_add(counts_ptr + slot, one, mask=ok, sem="relaxed")
        if WITH_OFFSETS:
            width = tl.load(width_ptr + cols, mask=col_ok, other=1.0)[None, :]
            shift = raw.to(tl.float64) - q.to(tl.float64) * width
            tl.atomic_add(offsets_ptr + slot, shift - 0.5 * width, mask=ok, sem="relaxed")

    def _move_kernel(counts_ptr, offsets_ptr, level_ptr, origin_ptr, new_level_ptr, new_origin_ptr, width_ptr,
                     new_width_ptr, bins,
                     WITH_OFFSETS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        level = tl.load(level_ptr + row)
        origin = tl.load(origin_ptr + row)
        new_level = tl.load(new_level_ptr + row)
        new_origin = tl.load(new_origin_ptr + row)
        if (new_level != level) | (new_origin != origin):
            k = tl.arange(0, BLOCK)
            ok = k < bins
            base = row.to(tl.int64) * bins
            n = tl.load(counts_ptr + base + k, mask=ok, other=0)
            shift = tl.minimum(new_level - level, 63)
            old_abs = origin + k.to(tl.int64)
            new_abs = old_abs >> shift  # arithmetic: floor division by 2**shift
            new_k = tl.minimum(tl.maximum(new_abs - new_origin, 0), bins - 1)
            tl.store(counts_ptr + base + k, n * 0, mask=ok)
            if WITH_OFFSETS:
                off = tl.load(offsets_ptr + base + k, mask=ok, other=0.0)
                old_w = tl.load(width_ptr + row)
                new_w = tl.load(new_width_ptr + row)
                moved = off + n.to(tl.float64) * ((old_abs.to(tl.float64) + 0.5) * old_w
                                                  - (new_abs.to(tl.float64) + 0.5) * new_w)
                tl.store(offsets_ptr + base + k, tl.full((BLOCK,), 0.0, tl.float64), mask=ok)
            # the row is rewritten by the whole program: every thread's zeros land first
            tl.debug_barrier()
            tl.atomic_add(counts_ptr + base + new_k, n, mask=ok & (n != 0), sem="relaxed")
            if WITH_OFFSETS:
                tl.atomic_add(offsets_ptr + base + new_k, moved, mask=ok & (n != 0), sem="relaxed")

    def _edges_kernel(counts_ptr, prefix_ptr, width_ptr, inverse_ptr, origin_ptr, lo_ptr, hi_ptr, out_ptr,
                      fine_bins, bins, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = j <= bins
        w = tl.load(width_ptr + row)
        inv_w = tl.load(inverse_ptr + row)
        origin = tl.load(origin_ptr + row)
        lo = tl.load(lo_ptr + row)
        hi = tl.load(hi_ptr + row)
        base = row.to(tl.int64) * (fine_bins + 1)  # the prefix row; the counts row is base - row
        total = tl.load(prefix_ptr + base + fine_bins)
        v = lo + (hi - lo) / bins * j.to(tl.float64)  # edge j, as lo + step * j
        # the values below v, each fine bin's count spread uniformly over its data span
        k = tl.floor(v * inv_w).to(tl.int64) - origin
        k = tl.minimum(tl.maximum(k, 0), fine_bins - 1)
        edge = (origin + k).to(tl.float64) * w
        left = tl.maximum(edge, lo)
        right = tl.minimum(edge + w, hi)
        frac = (v - left) / (right - left)
        frac = tl.where(frac == frac, frac, 1.0)
        frac = tl.minimum(tl.maximum(frac, 0.0), 1.0)
        n = tl.load(counts_ptr + base - row + k, mask=ok, other=0.0)
        below = tl.load(prefix_ptr + base + k, mask=ok, other=0.0) + n * frac
        below = tl.where(v >= hi, total, tl.where(v < lo, 0.0, below))
        # as torch.histc, a constant row lands in the middle bin: all of it above that bin's left edge
        below = tl.where(lo == hi, tl.where(j > bins // 2, total, 0.0), below)
        tl.store(out_ptr + row.to(tl.int64) * (bins + 1) + j, below, mask=ok)

    @triton.jit
    def _plus(a, b):
        return a + b

    # tl.sum's own combine where it exists: Triton's interpreter sums it with numpy, any other
    # combine element by element in Python
    _add = getattr(tl.standard, "_sum_combine", _plus)

    def _ifmr_kernel(points_ptr, weights_ptr, p0_ptr, p1_ptr, p2_ptr, hi_ptr, lo_ptr, scales_ptr, inverse_ptr,
                     origin_ptr, losses_ptr, crossed_ptr, n, candidates, CANDIDATES: tl.constexpr,
                     BUCKETS: tl.constexpr):
        # one channel, CANDIDATES of its candidates ([CANDIDATES, 2, BUCKETS] lanes: the
        # candidate, where a bucket starts (0) or ends (1), the bucket)
        row = tl.program_id(0)
        cand = tl.program_id(1) * CANDIDATES + tl.arange(0, CANDIDATES)
        cand_ok = cand < candidates
        at = row.to(tl.int64) * candidates + cand
        s = tl.load(scales_ptr + at, mask=cand_ok, other=1.0)
        pair = tl.arange(0, 2)
        # the clip ends' quotients rounded half to even (np.rint; exact for these few hundreds)
        x = tl.div_rn(tl.load(tl.where(pair[None, :] == 0, lo_ptr, hi_ptr) + at[:, None], mask=cand_ok[:, None],
                              other=0.0), s[:, None])
        y = tl.floor(x + 0.5)
        y = tl.where((y - x == 0.5) & ((y - 2.0 * tl.floor(y * 0.5)) == 1.0), y - 1.0, y)
        j_lo = tl.reduce(tl.where(pair[None, :] == 0, y, 0.0), 1, _add)
        j_hi = tl.reduce(tl.where(pair[None, :] == 1, y, 0.0), 1, _add)
        inv_w = tl.load(inverse_ptr + row)
        origin = tl.load(origin_ptr + row)
        base = row.to(tl.int64) * n
        b = tl.arange(0, BUCKETS)
        starts = pair[None, :, None] == 0
        j3 = j_lo[:, None, None] + (b[None, None, :] + pair[None, :, None] - 1).to(tl.float32)
        t = (j3 + 0.5) * s[:, None, None]  # a bucket's upper rounding threshold, float32
        k = tl.floor(t.to(tl.float64) * inv_w).to(tl.int64) - origin
        inside = (k >= 0) & (k < n)
        kc = tl.minimum(tl.maximum(k, 0), n - 1)
        # bin means lie inside their aligned bins: only the bin holding t needs a comparison
        mean = tl.load(points_ptr + base + kc)
        end3 = tl.where(k < 0, 0, tl.where(k >= n, n, kc + (mean < t.to(tl.float64)).to(tl.int64)))
        below_hi = j3 < j_hi[:, None, None]
        end3 = tl.where(below_hi, end3, n)
        end3 = tl.where(starts & (b[None, None, :] == 0), 0, end3)  # the first bucket starts at 0
        start = tl.reduce(tl.where(starts, end3, 0), 1, _add)
        end = tl.reduce(tl.where(starts, 0, end3), 1, _add)
        w_k = tl.load(weights_ptr + base + kc)
        crossing = tl.reduce(tl.where(~starts & inside & below_hi, w_k, 0.0), 1, _add)
        j = j_lo[:, None] + b[None, :].to(tl.float32)
        active = (j <= j_hi[:, None]) & (start < n)  # the walk stops after the bucket that reaches n
        pb = base + row  # the prefix rows are n + 1 long
        e0 = tl.load(p0_ptr + pb + end) - tl.load(p0_ptr + pb + start)
        e1 = tl.load(p1_ptr + pb + end) - tl.load(p1_ptr + pb + start)
        e2 = tl.load(p2_ptr + pb + end) - tl.load(p2_ptr + pb + start)
        q = (j * s[:, None]).to(tl.float64)
        loss = tl.maximum(e0 * q * q - 2.0 * q * e1 + e2, 0.0)  # rounding can leave an exact zero negative
        tl.store(losses_ptr + at, tl.reduce(tl.where(active, loss, 0.0), 1, _add), mask=cand_ok)
        tl.store(crossed_ptr + at, tl.reduce(tl.where(active, crossing, 0.0), 1, _add), mask=cand_ok)

    #: every float operation rounded on its own, as in the torch operations (no contraction
    #: into fused multiply-adds)
    _OPTIONS = {"enable_fp_fusion": False}
    _COMPILED = {fn: triton.jit(fn) for fn in (_count_kernel, _move_kernel, _edges_kernel, _ifmr_kernel)}
    _INTERPRETED: dict = {}

    def _on_device(t: torch.Tensor):
        # Triton launches on the current device's current stream; a model spread over several
        # GPUs hands over states of other devices than the current one
        if t.device.type == "cuda":
            return torch.cuda.device(t.device)
        if t.device.type == "cpu":  # the interpreter's numpy: lanes the kernel masks or replaces may be 0/0
            import numpy
            return numpy.errstate(invalid="ignore", divide="ignore")
        return contextlib.nullcontext()

    def _kernel(fn, t: torch.Tensor):
        if t.device.type != "cpu":
            return _COMPILED[fn]
        if fn not in _INTERPRETED:
            from triton.runtime.interpreter import InterpretedFunction
            _INTERPRETED[fn] = InterpretedFunction(fn)
        return _INTERPRETED[fn]

    @torch.library.custom_op("amct_hf::count_on_grid", mutates_args=("counts", "offsets"))
    def _count_op(x: torch.Tensor, inverse: torch.Tensor, origin: torch.Tensor, width: torch.Tensor,
                  counts: torch.Tensor, offsets: torch.Tensor) -> None:
        n, c = x.shape
        if n == 0 or c == 0:
            return
        block_c = min(64, triton.next_power_of_2(c))
        block_n = max(1, 2048 // block_c)
        grid = (triton.cdiv(n, block_n), triton.cdiv(c, block_c))
        with_offsets = offsets.shape[1] > 0  # else never read: any valid pointer will do
        with _on_device(x):
            _kernel(_count_kernel, x)[grid](
                x, x.stride(0), x.stride(1), n, c, inverse, origin, width, counts,
                offsets if with_offsets else counts, counts.shape[1], WITH_OFFSETS=with_offsets, BLOCK_N=block_n,
                BLOCK_C=block_c, **_OPTIONS)

    @_count_op.register_fake
    def _(x, inverse, origin, width, counts, offsets) -> None:
        return None

    @torch.library.custom_op("amct_hf::move_rows", mutates_args=("counts", "offsets"))
    def _move_op(counts: torch.Tensor, offsets: torch.Tensor, level: torch.Tensor, origin: torch.Tensor,
                 new_level: torch.Tensor, new_origin: torch.Tensor, width: torch.Tensor,
                 new_width: torch.Tensor) -> None:
        c, bins = counts.shape
        if c == 0:
            return
        if bins > MOVE_MAX_BINS:
            raise ValueError(f"move_rows takes rows of at most {MOVE_MAX_BINS} bins, not {bins}")
        with_offsets = offsets.shape[1] > 0
        with _on_device(counts):
            _kernel(_move_kernel, counts)[(c,)](
                counts, offsets if with_offsets else counts, level, origin, new_level, new_origin, width, new_width,
                bins, WITH_OFFSETS=with_offsets, BLOCK=triton.next_power_of_2(bins), **_OPTIONS)

    @_move_op.register_fake
    def _(counts, offsets, level, origin, new_level, new_origin, width, new_width) -> None:
        return None

    @torch.library.custom_op("amct_hf::cumulative_at_edges", mutates_args=("out",))
    def _edges_op(counts: torch.Tensor, prefix: torch.Tensor, width: torch.Tensor, inverse: torch.Tensor,
                  origin: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, out: torch.Tensor) -> None:
        c, edges = out.shape
        if c == 0:
            return
        block = min(1024, triton.next_power_of_2(edges))
        with _on_device(out):
            _kernel(_edges_kernel, out)[(c, triton.cdiv(edges, block))](
                counts, prefix, width, inverse, origin, lo, hi, out, counts.shape[1], edges - 1, BLOCK=block,
                **_OPTIONS)

    @_edges_op.register_fake
    def _(counts, prefix, width, inverse, origin, lo, hi, out) -> None:
        return None

    @torch.library.custom_op("amct_hf::ifmr_bucket_losses", mutates_args=("losses", "crossed"))
    def _ifmr_op(points: torch.Tensor, weights: torch.Tensor, p0: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor,
                 hi: torch.Tensor, lo: torch.Tensor, scales: torch.Tensor, inverse: torch.Tensor,
                 origin: torch.Tensor, losses: torch.Tensor, crossed: torch.Tensor, buckets: int) -> None:
        c, r = losses.shape
        # a GPU runs a program per candidate; the interpreter's cost is per program, so there
        # one program takes all of a channel's candidates
        per_program = 1 if losses.device.type != "cpu" else triton.next_power_of_2(r)
        with _on_device(losses):
            _kernel(_ifmr_kernel, losses)[(c, triton.cdiv(r, per_program))](
                points, weights, p0, p1, p2, hi, lo, scales, inverse, origin, losses, crossed, points.shape[1], r,
                CANDIDATES=per_program, BUCKETS=triton.next_power_of_2(buckets), **_OPTIONS)

    @_ifmr_op.register_fake
    def _(points, weights, p0, p1, p2, hi, lo, scales, inverse, origin, losses, crossed, buckets) -> None:
        return None
