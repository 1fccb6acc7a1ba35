"""Bounded-memory observers for the driver, mergeable across batches and processes in
any order.

Both keep an :class:`~amct_hf.algorithms.aligned.AlignedHistogram` per layer, whose size
does not depend on the number of calibration tokens; the solves are in
:mod:`amct_hf.algorithms.streaming`.
"""
from __future__ import annotations

import copy

import torch

from ..algorithms import fused, kernels
from ..algorithms.aligned import COUNT_LIMIT, AlignedHistogram
from ..algorithms.hfmg import HistogramState, check_binnable, hfmg_factors
from ..algorithms.streaming import extreme_ranks, streaming_hfmg_factors, streaming_ifmr_factors
from ..errors import InvalidArgumentError
from .base import Observer, register_observer

__all__ = ["StreamingIFMRObserver", "StreamingHFMGObserver", "default_grid_bins",
           "check_grid_bins", "GRID_BINS_RANGE", "extremes_for_count"]

#: allowed fine-grid sizes per channel: below 64 the grid is too coarse for any solve;
#: 2**20 already holds 8 MB per channel
GRID_BINS_RANGE = (64, 1 << 20)


def default_grid_bins(per_channel: bool) -> int:
    return 2048 if per_channel else 65536


def check_grid_bins(value) -> int | None:
    """``stream_bins``: None (the default), or an int in :data:`GRID_BINS_RANGE`."""
    if value is None:
        return None
    lo, hi = GRID_BINS_RANGE
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidArgumentError(
            f"stream_bins={value!r} is not allowed: expected None (default: 2048 per channel, "
            f"65536 per tensor) or an int in [{lo}, {hi}]")
    return value


#: values counted per step of a grouped update on the torch path (its index and offset
#: temporaries take about 30 bytes per value)
CHUNK_VALUES = 1 << 25
#: rows (channels of all entries together) per batched HFMG solve on the torch path
SOLVE_ROWS = 1 << 15
#: rows per batched IFMR solve on the torch path (its candidate losses hold about 33 KB per row)
IFMR_SOLVE_ROWS = 1 << 13


def _solve_in_groups(observers: list, max_rows: int, solve, key=None) -> list:
    """``[obs.compute() for obs in observers]``, on the torch path by ``solve(group)`` over
    runs of consecutive observers with the same ``key`` and at most ``max_rows`` channels
    together (one observer alone may hold more)."""
    if not observers or kernels.use_kernels(observers[0].hist.counts):
        return [obs.compute() for obs in observers]
    results, group, rows = [], [], 0
    for obs in observers:
        if group and (rows + obs.num_channels > max_rows or (key is not None and key(obs) != key(group[0]))):
            results += solve(group)
            group, rows = [], 0
        group.append(obs)
        rows += obs.num_channels
    return results + solve(group)


class _Flushed:
    """An observer attribute that adds the staged values before it is read."""

    def __init__(self, slot: str):
        self.slot = slot

    def __get__(self, obs, owner=None):
        if obs is None:
            return self
        obs._flush()
        return getattr(obs, self.slot)

    def __set__(self, obs, value):
        setattr(obs, self.slot, value)


class _Streaming(Observer):
    reduction = "one grid (global min/max), histogram counts summed"
    #: channels of several entries can share one observer (observers.stacked)
    stackable = True
    with_offsets = True
    # Values staged per layer before the compiled histogram update runs (CPU only). The
    # update is bound by cache misses into the [C, bins] histogram, which is cold again at
    # every layer's turn; one update over several batches touches far fewer new lines per
    # value. The buffer is allocated at full size on first use, so memory stays flat.
    stage_values = 1 << 19

    def __init__(self, params, channels, device=None, bins: int | None = None):
        super().__init__(params, channels, device)
        self.bins = check_grid_bins(bins) or default_grid_bins(params.per_channel)
        # int32 counts on a device (half the table traffic), widened before a row could overflow them
        self._hist = AlignedHistogram.empty(channels, self.bins, device, self.with_offsets, narrow=True)
        self._stage: torch.Tensor | None = None  # [C, S] float32, channel-major
        self._staged = 0
        self.count = 0  # values per channel

    # the statistics of every value seen so far: reading them adds the staged values first
    hist = _Flushed("_hist")

    def _room_for(self, values: int) -> None:
        """Counts wide enough for ``values`` more per channel (a bin holds at most all of them)."""
        if self.count + values > COUNT_LIMIT:
            self._hist.widen()

    def update(self, x):
        self._room_for(x.shape[0])
        self._add(x)
        self.count += x.shape[0]
        self.batches += 1

    def _add(self, x) -> None:
        n, c = x.shape
        size = max(1, self.stage_values // c)
        if not kernels.use_kernels(x) or n > size:
            self._flush()
            self._update_now(x, channels_first=False)
            return
        if self._staged + n > size:
            self._flush()
        if self._stage is None:
            self._stage = torch.zeros(c, size)  # zero-filled: every page is resident from the start
        # [N, 1].t() has degenerate strides that send copy_ down a slow path (50x)
        self._stage[:, self._staged:self._staged + n].copy_(x.reshape(1, -1) if c == 1 else x.t())
        self._staged += n

    def _flush(self) -> None:
        if self._staged:
            staged, self._staged = self._stage[:, :self._staged], 0
            self._update_now(staged, channels_first=True)

    def _update_now(self, x, channels_first: bool) -> None:
        self._hist.update(x, channels_first=channels_first)

    def update_parts(self, parts, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Several [rows, C] batches at once (torch path; any iterable, read once), whose per-channel range ``[lo,
        hi]`` the caller has reduced already: the grid moves once for all of them, and the
        values are counted in chunks of at most :data:`CHUNK_VALUES` (so the temporaries
        of the counting stay bounded whatever was staged)."""
        h = self.hist
        h.regrid(torch.minimum(h.lo, lo), torch.maximum(h.hi, hi))
        for part in parts:
            self._room_for(part.shape[0])
            # the fused kernels hold no per-value temporaries: a part is one launch
            rows = part.shape[0] if fused.use_fused(part) else max(1, CHUNK_VALUES // max(1, part.shape[1]))
            for chunk in part.split(max(1, rows)):
                self._add_on_grid(chunk)
            self.count += part.shape[0]
            self.batches += 1

    def _add_on_grid(self, x) -> None:
        self._hist.add_on_grid(x)

    def rows(self, start: int, stop: int) -> _Streaming:
        """The observer of channels ``start:stop`` alone (see :mod:`amct_hf.observers.stacked`)."""
        part = copy.copy(self)
        part.num_channels = stop - start
        part._hist = self.hist.rows(start, stop)
        return part

    def merge(self, other: _Streaming) -> None:
        """Add the statistics another observer of the same channels gathered."""
        if self.count + other.count > COUNT_LIMIT:
            self.hist.widen()
            other.hist.widen()
        self.hist.merge(other.hist)
        self.count += other.count
        self.batches += other.batches

    def reduce(self, comm) -> None:
        self.hist.reduce(comm)
        self._stage = None
        self.count = int(comm.all_reduce(torch.tensor([self.count], dtype=torch.int64), "sum").item())


#: exact extremes kept per channel when the count of values is not known in advance
DEFAULT_TOPK = 64
#: extremes kept beyond the deepest rank the expected count needs
TOPK_MARGIN = 16
#: at most this many extremes per buffer (all channels together, 16 MiB of float32): a
#: rank deeper than that (a percentile far from 1 on a large count) is read from the histogram
TOPK_VALUES_LIMIT = 1 << 22


def extremes_for_count(params, channels: int, count: int | None) -> int:
    """How many exact extremes per channel to keep so that IFMR's initial bounds among
    ``count`` values per channel are read exactly (None: the count is unknown)."""
    if count is None:
        return DEFAULT_TOPK
    need = max(extreme_ranks(max(int(count), 1), params)) + TOPK_MARGIN
    return max(DEFAULT_TOPK, min(need, max(1, TOPK_VALUES_LIMIT // max(channels, 1))))


@register_observer("ifmr", "streaming")
class StreamingIFMRObserver(_Streaming):
    reduction = _Streaming.reduction + "; exact extremes merged (top-K of all ranks)"
    #: the bank passes ``expected_count`` (values per channel over all processes) when it knows it
    sized_by_count = True

    def __init__(self, params, channels, device=None, bins: int | None = None, topk: int | None = None,
                 expected_count: int | None = None, entry_channels: int | None = None):
        super().__init__(params, channels, device, bins)
        # grouped entries (observers.stacked) keep what each entry alone would keep
        self.topk = topk if topk is not None else extremes_for_count(params, entry_channels or channels,
                                                                    expected_count)
        #: after compute(): False where a rank was beyond the extremes kept (read from the histogram)
        self.extremes_exact: bool | None = None
        # [C, K] rows: the K largest (descending) and smallest (ascending) values seen
        self._top = torch.full((channels, self.topk), float("-inf"), device=device)
        self._bottom = torch.full((channels, self.topk), float("inf"), device=device)

    top = _Flushed("_top")
    bottom = _Flushed("_bottom")

    def _update_now(self, x, channels_first):
        if not self._hist.update(x, self._top, self._bottom, channels_first=channels_first):
            self._keep_extremes(x.t() if channels_first else x)

    def _add_on_grid(self, x):
        super()._add_on_grid(x)
        self._keep_extremes(x)

    def _keep_extremes(self, x) -> None:
        k = min(self.topk, x.shape[0])
        self._merge_extremes(x.topk(k, 0).values.t(), x.topk(k, 0, largest=False).values.t())

    def _merge_extremes(self, top: torch.Tensor, bottom: torch.Tensor) -> None:
        """Keep the ``topk`` largest / smallest of the kept extremes and these ([C, *] each)."""
        self._top = torch.cat([self._top, top], 1).topk(self.topk, 1).values
        self._bottom = torch.cat([self._bottom, bottom], 1).topk(self.topk, 1, largest=False).values

    def rows(self, start, stop):
        part = super().rows(start, stop)
        part._top, part._bottom = self.top[start:stop], self.bottom[start:stop]
        return part

    def merge(self, other):
        super().merge(other)
        self._merge_extremes(other.top, other.bottom)

    def reduce(self, comm):
        super().reduce(comm)
        if comm.active:
            self.top = comm.all_gather_cat(self.top, dim=1).topk(self.topk, 1).values
            self.bottom = comm.all_gather_cat(self.bottom, dim=1).topk(self.topk, 1, largest=False).values

    def compute(self):
        # the bank says once per run when a rank was beyond the extremes kept, not per entry
        hist, top, bottom = self.hist, self.top, self.bottom
        self.extremes_exact = max(extreme_ranks(self.count, self.params)) <= top.shape[1]
        scales, offsets, self.tolerance = streaming_ifmr_factors(
            hist, top, bottom, self.count, self.params, warn=False)
        return scales, offsets

    @classmethod
    def compute_many(cls, observers: list) -> list:
        """:meth:`compute` of every observer; on the torch path the channels of entries
        with the same count, extremes and grid size are solved together (up to
        :data:`IFMR_SOLVE_ROWS` rows: a few hundred kernels and reads for all of them instead
        of per entry). Each row's solve reads its own statistics only, so the factors and
        tolerances are those of :meth:`compute`."""
        return _solve_in_groups(observers, IFMR_SOLVE_ROWS, cls._solve_group,
                                key=lambda obs: (obs.count, obs.topk, obs.bins))

    @staticmethod
    def _solve_group(group: list) -> list:
        if len(group) == 1:
            return [group[0].compute()]
        first = group[0]
        hist = AlignedHistogram.cat([o.hist for o in group])
        scales, offsets, tolerance = streaming_ifmr_factors(
            hist, torch.cat([o.top for o in group]), torch.cat([o.bottom for o in group]), first.count,
            first.params, warn=False)
        sizes = [o.num_channels for o in group]
        exact = max(extreme_ranks(first.count, first.params)) <= first.top.shape[1]
        for obs, bound in zip(group, tolerance.split(sizes)):
            obs.tolerance, obs.extremes_exact = bound, exact
        return list(zip(scales.split(sizes), offsets.split(sizes)))


@register_observer("hfmg", "streaming")
class StreamingHFMGObserver(_Streaming):
    with_offsets = False  # HFMG needs counts only: half the memory

    def compute(self):
        return streaming_hfmg_factors(self.hist, self.params.num_of_bins, self.params.asymmetric)

    def check(self) -> None:
        """ValueError if the range cannot be binned (before :meth:`compute_many`)."""
        check_binnable(self.hist.lo, self.hist.hi, self.params.num_of_bins)

    @classmethod
    def compute_many(cls, observers: list) -> list:
        """:meth:`compute` of every observer; on the torch path the channels of all of
        them are solved as one batch (the candidate walk is a sequence of steps, each a
        few kernels: one walk for every entry instead of one per entry). Each row's
        solve depends on its own histogram only, so the factors are those of
        :meth:`compute`."""
        return _solve_in_groups(observers, SOLVE_ROWS, cls._solve_group)

    @staticmethod
    def _solve_group(group: list) -> list:
        p = group[0].params
        hists = [obs.hist for obs in group]
        for h in hists:
            check_binnable(h.lo, h.hi, p.num_of_bins)
        state = HistogramState(torch.cat([h.resample(p.num_of_bins) for h in hists]),
                               torch.cat([h.lo for h in hists]), torch.cat([h.hi for h in hists]))
        scales, offsets = hfmg_factors(state, p.asymmetric)
        sizes = [h.lo.shape[0] for h in hists]
        return list(zip(scales.split(sizes), offsets.split(sizes)))
