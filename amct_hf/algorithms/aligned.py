"""Per-channel histogram on a power-of-two grid aligned at zero.

Bin ``a`` of level ``e`` holds the values with ``floor(x / 2**e) == a``. Moving to a
coarser level merges whole bins exactly, so the histogram of a stream does not depend
on how the stream was batched, ordered or split between processes: the level and
origin are a function of the final (min, max) only, and the counts are those of all
values on that grid. Each bin also keeps the sum of its values' offsets from the bin
centre, so its mean is known.

Two implementations hold the same statistics: the compiled kernels (CPU) and the torch
path (any device, see :func:`~amct_hf.algorithms.kernels.torch_path`). The torch path is
written for accelerators: an update is a fixed sequence of tensor operations whatever the
channel count, never reads a value back to the host, and runs the per-value work in
float32/int64 (the bin index of ``x`` is exact in float32, see :func:`_floor_quotient`;
counts are int64, or int32 while no row can overflow them). Only the per-bin offsets,
whose sums have no exact float32 form, are accumulated in float64.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from . import fused, kernels

__all__ = ["AlignedHistogram", "fit_level", "MIN_LEVEL", "COUNT_LIMIT"]

# 2**-32: fine enough for any activation range, and floor(x * 2**32) stays in int64
MIN_LEVEL = -32
#: values per row that int32 counts hold without overflow
COUNT_LIMIT = (1 << 31) - 1


def _floor_index(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    # x * 2**-level is exact (power-of-two scaling), so the bin index is exact
    return torch.floor(torch.ldexp(x.to(torch.float64), -level.to(torch.float64))).to(torch.int64)


def _pow2_float32(e: torch.Tensor) -> torch.Tensor:
    """2**e as float32, built from its bits (exact; no pow rounding on any device).
    ``e`` is clamped to the normal range [-126, 127]."""
    bits = (e.clamp(-126, 127).to(torch.int32) + 127) << 23
    return bits.view(torch.float32)


def _width(level: torch.Tensor) -> torch.Tensor:
    """2**level as float64 (exact)."""
    return torch.ldexp(torch.ones_like(level, dtype=torch.float64), level.double())


def _floor_quotient(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """``floor(x / 2**level)`` as float32, for float32/float16/bfloat16 ``x`` (an exact
    promotion). ``floor_divide`` takes the floor from the exact remainder (``fmod``), so a
    tiny negative ``x`` whose quotient underflows still gets -1, and a quotient by a power
    of two is exact otherwise; one kernel. Equals :func:`_floor_index` for every level the
    grid uses (|level| <= 126) and every index that fits int64."""
    return torch.floor_divide(x, _pow2_float32(level))


def _bins_on_grid(x: torch.Tensor, level: torch.Tensor, origin: torch.Tensor, bins: int):
    """(``floor(x / 2**level)`` as float32, the bin ``floor(x / 2**level) - origin`` as int64)
    of a [tokens, C] batch inside the grid of every channel, computed in float32: the
    quotient and the origin (itself the quotient of a float32 minimum) are float32 integers,
    and their difference, an integer below ``bins``, is exact. A NaN or a value off the grid
    (only with NaN/Inf in the data, which the caller's check reports before anything is
    written) is sent to an end bin instead of out of the table."""
    quotient = _floor_quotient(x, level[None, :])
    rel = (quotient - origin.to(torch.float32)[None, :]).nan_to_num_(0.0, bins - 1.0, 0.0).clamp_(0, bins - 1)
    return quotient, rel.to(torch.int64)


def fit_level(lo: torch.Tensor, hi: torch.Tensor, bins: int) -> torch.Tensor:
    """Smallest level (>= MIN_LEVEL) at which [lo, hi] spans at most ``bins`` bins ([C] int64)."""
    span = (hi.double() - lo.double()).clamp_min(0)
    guess = torch.ceil(torch.log2(span / (bins - 1))).nan_to_num(MIN_LEVEL, MIN_LEVEL, MIN_LEVEL)
    guess = guess.clamp(MIN_LEVEL, 1000).to(torch.int64)
    level = guess + 1  # always fits: span / 2**(guess+1) <= (bins - 1) / 2
    for cand in (guess, guess - 1):  # log2 rounding may leave a finer level that fits
        ok = (cand >= MIN_LEVEL) & (_floor_index(hi, cand) - _floor_index(lo, cand) <= bins - 1)
        level = torch.where(ok, cand, level)
    return level


@dataclass
class AlignedHistogram:
    counts: torch.Tensor   # [C, B] float64
    offsets: torch.Tensor  # [C, B] float64: sum of (x - bin centre) per bin ([C, 0]: not kept)
    level: torch.Tensor    # [C] int64: bin width is 2**level
    origin: torch.Tensor   # [C] int64: absolute index of bin 0
    lo: torch.Tensor       # [C] float32 exact minimum
    hi: torch.Tensor       # [C] float32 exact maximum

    @classmethod
    def empty(cls, channels: int, bins: int, device=None, with_offsets: bool = True,
              narrow: bool = False) -> AlignedHistogram:
        """No values yet. Counts are float64 for the compiled kernels, int64 on the torch path
        (``narrow``: int32, half the table's memory traffic; its owner calls :meth:`widen`
        before any row could pass :data:`COUNT_LIMIT` values)."""
        f64 = dict(dtype=torch.float64, device=device)
        compiled = kernels.use_kernels(torch.empty(0, device=device))
        dtype = torch.float64 if compiled else torch.int32 if narrow else torch.int64
        counts = torch.zeros(channels, bins, dtype=dtype, device=device)
        return cls(counts, torch.zeros(channels, bins if with_offsets else 0, **f64),
                   torch.full((channels,), MIN_LEVEL, dtype=torch.int64, device=device),
                   torch.zeros(channels, dtype=torch.int64, device=device),
                   torch.full((channels,), float("inf"), device=device),
                   torch.full((channels,), float("-inf"), device=device))

    def widen(self) -> None:
        """int64 counts from here on (a no-op unless they are int32)."""
        if self.counts.dtype == torch.int32:
            self.counts = self.counts.long()

    def rows(self, start: int, stop: int) -> AlignedHistogram:
        """Channels ``start:stop`` (views: a channel's statistics depend on its own values only)."""
        return AlignedHistogram(*(getattr(self, f.name)[start:stop] for f in dataclasses.fields(self)))

    @classmethod
    def cat(cls, hists: list[AlignedHistogram]) -> AlignedHistogram:
        """The channels of every histogram, in order, in one (the converse of :meth:`rows`)."""
        return cls(*(torch.cat([getattr(h, f.name) for h in hists]) for f in dataclasses.fields(cls)))

    def merge(self, other: AlignedHistogram) -> None:
        """Add ``other``'s statistics of the same channels (both move to the grid of the union)."""
        lo, hi = torch.minimum(self.lo, other.lo), torch.maximum(self.hi, other.hi)
        self.regrid(lo, hi)
        other.regrid(lo, hi)
        integers = not (self.counts.is_floating_point() or other.counts.is_floating_point())
        # integer counts add in the wider of the two types (int32 + int64 -> int64)
        self.counts = self.counts + (other.counts if integers else other.counts.to(self.counts.dtype))
        if self.offsets.numel():
            self.offsets = self.offsets + other.offsets

    @property
    def bins(self) -> int:
        return self.counts.shape[1]

    @property
    def width(self) -> torch.Tensor:
        return _width(self.level)

    @property
    def inverse_width(self) -> torch.Tensor:
        """2**-level as float64 (exact)."""
        return _width(-self.level)

    def _compiled(self, t: torch.Tensor) -> bool:
        return kernels.use_kernels(t) and self.counts.dtype == torch.float64

    def regrid(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Move to the grid that [lo, hi] (a superset of the current range) dictates.

        The compiled path skips an unchanged grid (the usual case once the range has
        settled). The torch path always runs the move, an identity on an unchanged grid:
        deciding would read device values back to the host."""
        compiled = self._compiled(self.counts)
        if compiled and torch.equal(lo, self.lo) and torch.equal(hi, self.hi):
            return  # the grid is a function of the range
        level = torch.maximum(fit_level(lo, hi, self.bins), self.level)
        origin = _floor_index(lo, level)
        if compiled and torch.equal(level, self.level) and torch.equal(origin, self.origin):
            self.lo, self.hi = lo, hi
            return
        if compiled:
            kernels.aligned_regrid(self.level.numpy(), self.origin.numpy(), level.numpy(), origin.numpy(),
                                   self.counts.numpy(), self.offsets.numpy())
            self.level, self.origin, self.lo, self.hi = level, origin, lo, hi
            return
        if fused.use_fused(self.counts) and self.bins <= fused.MOVE_MAX_BINS and not self.counts.is_floating_point():
            # in place, rows whose grid is unchanged untouched (the tables are this histogram's own)
            fused.move_rows(self.counts, self.offsets, self.level, self.origin, level, origin, self.width,
                            _width(level))
            self.level, self.origin, self.lo, self.hi = level, origin, lo, hi
            return
        shift = (level - self.level).clamp(max=63)
        c, b = self.counts.shape
        old_abs = self.origin[:, None] + torch.arange(b, device=self.counts.device)
        new_abs = torch.bitwise_right_shift(old_abs, shift[:, None])  # floor division by 2**shift
        new_k = (new_abs - origin[:, None]).clamp(0, b - 1)
        old_w, new_w = self.width[:, None], _width(level)[:, None]
        moved = (self.offsets + self.counts * ((old_abs + 0.5) * old_w - (new_abs + 0.5) * new_w)
                 if self.offsets.numel() else None)
        counts = torch.zeros_like(self.counts).scatter_add_(1, new_k, self.counts)
        offsets = torch.zeros_like(self.offsets).scatter_add_(1, new_k, moved) if self.offsets.numel() \
            else self.offsets
        self.counts, self.offsets, self.level, self.origin = counts, offsets, level, origin
        self.lo, self.hi = lo, hi

    def update(self, x: torch.Tensor, top=None, bottom=None, channels_first: bool = False) -> bool:
        """Add a [tokens, C] batch (``channels_first``: a [C, tokens] one). With the compiled
        kernels, also keeps the given sorted per-channel extreme buffers ([C, K]: largest
        descending, smallest ascending) and returns True; otherwise the caller maintains them."""
        if self._compiled(x):
            x = x.to(torch.float32)
        # the torch path takes x in its own dtype: float16/bfloat16 values are float32 values,
        # and every operation below promotes them exactly (one pass less over the batch)
        if x.shape[1 - channels_first] == 1:  # per-tensor: a flat reduction is much faster
            lo, hi = torch.aminmax(x.reshape(-1))
            lo, hi = lo.reshape(1), hi.reshape(1)
        elif channels_first and self._compiled(x) and x.shape[1]:
            # torch's per-row aminmax costs as much as a third of the histogram update here
            lo, hi = (torch.from_numpy(a) for a in kernels.row_ranges(x.numpy(), x.shape[1]))
        else:
            lo, hi = torch.aminmax(x, dim=int(channels_first))
        self.regrid(torch.minimum(self.lo, lo), torch.maximum(self.hi, hi))
        if self._compiled(x):
            args = (self.level.numpy(), self.origin.numpy(), self.counts.numpy(), self.offsets.numpy(),
                    None if top is None else top.numpy(), None if bottom is None else bottom.numpy())
            if channels_first:
                kernels.aligned_update_columns(x.numpy(), *args)
            else:
                kernels.aligned_update(x.contiguous().numpy(), *args)
            return top is not None
        self.add_on_grid(x.t() if channels_first else x)
        return False

    def add_on_grid(self, x: torch.Tensor) -> None:
        """Count a [tokens, C] batch (any float dtype) that the current grid already covers
        (after :meth:`regrid` to a range holding it; torch path)."""
        if fused.use_fused(x) and not self.counts.is_floating_point():
            fused.count_on_grid(x, _pow2_float32(-self.level), self.origin.to(torch.float32), self.width,
                                self.counts, self.offsets)
            return
        quotient, rel = _bins_on_grid(x, self.level, self.origin, self.bins)
        idx = rel.t()  # [C, tokens]: the table's rows
        # scatter_add straight into the fixed-size table (bincount would read max(index) back
        # to the host); the regrid before left fresh tables, so no other tensor shares them
        self.counts.scatter_add_(1, idx, torch.ones(1, dtype=self.counts.dtype, device=x.device).expand(idx.shape))
        if self.offsets.numel():
            # x - (bin + 1/2) * width in float64: quotient * width is exact (an integer times a
            # power of two), and so is every difference whose bits fit a float64
            width = self.width[None, :]
            shift = torch.addcmul(x, quotient, width, value=-1).sub_(0.5 * width)
            self.offsets.scatter_add_(1, idx, shift.t())

    def reduce(self, comm) -> None:
        """Sum the histograms of every process (after agreeing on one grid)."""
        if not comm.active:
            return
        # every rank lands on fit_level(global range): its own level never exceeds that
        self.regrid(comm.all_reduce(self.lo, "min"), comm.all_reduce(self.hi, "max"))
        # float64 on every rank (exact to 2**53): a rank that saw no token holds the CPU
        # kernels' float64 counts, a device rank int64 ones, and a reduction needs one dtype
        self.counts = comm.all_reduce(self.counts.double(), "sum")
        if self.offsets.numel():
            self.offsets = comm.all_reduce(self.offsets, "sum")

    def edges(self) -> torch.Tensor:
        """Left edge of every bin ([C, B] float64)."""
        b = self.bins
        idx = self.origin[:, None] + torch.arange(b, device=self.counts.device)
        return idx.double() * self.width[:, None]

    def means(self) -> torch.Tensor:
        """Mean value of every bin (its centre when empty), non-decreasing along B."""
        if self.offsets.shape[1] != self.bins:
            raise RuntimeError("this histogram does not keep per-bin offsets")
        if self._compiled(self.counts):  # one pass instead of a chain of [C, B] temporaries
            return torch.from_numpy(kernels.aligned_means(
                self.counts.contiguous().numpy(), self.offsets.contiguous().numpy(),
                self.level.numpy(), self.origin.numpy()))
        centre = self.edges() + 0.5 * self.width[:, None]
        return centre + torch.where(self.counts > 0, self.offsets / self.counts.clamp_min(1),
                                    torch.zeros_like(self.offsets))

    def resample(self, bins: int) -> torch.Tensor:
        """Counts on ``bins`` equal bins over [lo, hi] per channel ([C, bins] float64), each fine
        bin spread uniformly over its data span; as torch.histc, a constant channel lands in
        the middle bin."""
        if fused.use_fused(self.counts):  # one kernel instead of [C, bins + 1] temporaries
            return fused.resample(self.counts, self.width, self.inverse_width, self.origin, self.lo, self.hi, bins)
        if self._compiled(self.counts):  # one pass per channel, bit for bit the same
            return torch.from_numpy(kernels.aligned_resample(
                self.counts.contiguous().numpy(), self.level.numpy(), self.origin.numpy(),
                self.lo.numpy(), self.hi.numpy(), bins))
        step = (self.hi.double() - self.lo.double()) / bins
        edges = self.lo.double()[:, None] + step[:, None] * torch.arange(bins + 1, dtype=torch.float64,
                                                                         device=self.lo.device)
        hist = self.cumulative_at(edges).diff(dim=1)
        const = (self.lo == self.hi)[:, None]
        middle = torch.zeros_like(hist)
        middle[:, bins // 2] = self.counts.sum(1).double()
        return torch.where(const, middle, hist)

    def cumulative_at(self, x: torch.Tensor) -> torch.Tensor:
        """Count of values below ``x`` ([C, M] float64), uniform within each bin's data span."""
        if self._compiled(x):
            return torch.from_numpy(kernels.aligned_cumulative(
                self.counts.contiguous().numpy(), self.level.numpy(), self.origin.numpy(),
                self.lo.numpy(), self.hi.numpy(), x.double().contiguous().numpy()))
        edges = self.edges()
        # the bin holding x, read off the aligned grid (no search needed)
        k = (_floor_index(x, self.level[:, None]) - self.origin[:, None]).clamp(0, self.bins - 1)
        counts = self.counts.double()
        prefix = torch.cat([torch.zeros_like(counts[:, :1]), counts.cumsum(1)], 1)
        left = torch.maximum(edges.gather(1, k), self.lo.double()[:, None])
        right = torch.minimum(edges.gather(1, k) + self.width[:, None], self.hi.double()[:, None])
        frac = ((x.double() - left) / (right - left)).nan_to_num(1.0).clamp(0, 1)
        below = prefix.gather(1, k) + counts.gather(1, k) * frac
        below = torch.where(x.double() < self.lo.double()[:, None], torch.zeros_like(below), below)
        return torch.where(x.double() >= self.hi.double()[:, None], prefix[:, -1:].expand_as(below), below)
