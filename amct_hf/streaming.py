"""Observers for the calibration driver: bounded memory, and mergeable across batches
and processes in any order.

Both keep an :class:`~amct_hf.algorithms.aligned.AlignedHistogram` per layer, whose
size does not depend on the number of calibration tokens.

* ``ifmr_stream``: IFMR's candidates come from the exact extremes (exact order
  statistics up to rank ``topk`` are kept; beyond that rank they are read from the
  histogram). Each candidate's loss is evaluated with every fine bin's values placed at
  the bin's exact mean. For a bin that no quantization threshold crosses this differs
  from the exact loss by the bin's variance, the same for every candidate; a crossed
  bin adds at most ``2 * s * w * n_bin``. So the exact loss of the chosen candidate is
  within ``tolerance = 2 * max_r eps_r`` (reported per channel, in squared-error units)
  of the exact IFMR optimum.
* ``hfmg_stream``: the ``num_of_bins`` histogram over [min, max] is rebuilt from the
  fine histogram (counts spread uniformly within each fine bin), then HFMG runs as
  usual: the equivalent of the operator fed all samples as one batch, up to the fine
  bins' resolution.
"""
from __future__ import annotations

import logging

import torch

from .algorithms.aligned import AlignedHistogram
from .algorithms.common import order_statistic_k
from .algorithms.hfmg import HistogramState, hfmg_factors
from .algorithms import kernels
from .algorithms.ifmr import asymmetric_offset, choose_scale, first_min, ifmr_candidates, prefix_sums
from .observers import ExactIFMRObserver, HFMGObserver, Observer, register_observer

__all__ = ["StreamingIFMRObserver", "StreamingHFMGObserver", "OneBatchHFMGObserver",
           "default_stream_bins"]

logger = logging.getLogger("amct_hf")


def default_stream_bins(per_channel: bool) -> int:
    return 2048 if per_channel else 65536


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
    with_offsets = True
    # Values staged per layer before the compiled histogram update runs (CPU only). The
    # update is bound by cache misses into the [C, bins] histogram, which is cold again at
    # every layer's turn; one update over several batches touches far fewer new lines per
    # value. The buffer is allocated at full size on first use, so memory stays flat.
    stage_values = 1 << 19

    def __init__(self, params, bins: int | None = None):
        super().__init__(params)
        self.bins = bins or default_stream_bins(params.per_channel)
        self._hist: AlignedHistogram | None = None
        self._stage: torch.Tensor | None = None  # [C, S] float32, channel-major
        self._staged = 0
        self.count = 0  # values per channel

    # the statistics of every value seen so far: reading them adds the staged values first
    hist = _Flushed("_hist")

    def ensure(self, channels: int, device=None) -> None:
        if self._hist is None:
            self.num_channels = channels
            self._hist = AlignedHistogram.empty(channels, self.bins, device, self.with_offsets)

    def update(self, x):
        self.ensure(x.shape[1], x.device)
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

    def reduce(self, comm) -> None:
        self.hist.reduce(comm)
        self._stage = None
        self.count = int(comm.all_reduce(torch.tensor([self.count], dtype=torch.int64), "sum").item())


@register_observer("ifmr_stream")
class StreamingIFMRObserver(_Streaming):
    def __init__(self, params, bins: int | None = None, topk: int = 64):
        super().__init__(params, bins)
        self.topk = topk
        # [C, K] rows: the K largest (descending) and smallest (ascending) values seen
        self._top = self._bottom = None
        self.tolerance = None

    top = _Flushed("_top")
    bottom = _Flushed("_bottom")

    def ensure(self, channels, device=None):
        super().ensure(channels, device)
        if self._top is None:
            self._top = torch.full((channels, self.topk), float("-inf"), device=device)
            self._bottom = torch.full((channels, self.topk), float("inf"), device=device)

    def _update_now(self, x, channels_first):
        if not self._hist.update(x, self._top, self._bottom, channels_first=channels_first):
            if channels_first:
                x = x.t()
            k = min(self.topk, x.shape[0])
            self._top = torch.cat([self._top, x.topk(k, 0).values.t()], 1).topk(self.topk, 1).values
            self._bottom = torch.cat([self._bottom, x.topk(k, 0, largest=False).values.t()], 1).topk(
                self.topk, 1, largest=False).values

    def reduce(self, comm):
        super().reduce(comm)
        if comm.active:
            self.top = comm.all_gather_cat(self.top, dim=1).topk(self.topk, 1).values
            self.bottom = comm.all_gather_cat(self.bottom, dim=1).topk(self.topk, 1, largest=False).values

    def _order_statistic(self, k: int, largest: bool) -> torch.Tensor:
        if k <= self.topk:
            return (self.top if largest else self.bottom)[:, k - 1]
        logger.warning("IFMR percentile rank %d exceeds the %d exact extremes kept; "
                       "reading it from the histogram", k, self.topk)
        h = self.hist
        counts = h.counts.flip(1) if largest else h.counts
        idx = (counts.cumsum(1) >= k).to(torch.int8).argmax(1, keepdim=True)
        if largest:
            idx = h.bins - 1 - idx
        return h.means().gather(1, idx)[:, 0].to(torch.float32)

    def compute(self):
        p, h = self.params, self.hist
        max0 = self._order_statistic(order_statistic_k(self.count, p.max_percentile), True).clamp(min=0)
        min0 = self._order_statistic(order_statistic_k(self.count, p.min_percentile), False).clamp(max=0)
        hi, lo, scales = ifmr_candidates(max0, min0, p.asymmetric, p.search_range, p.search_step)
        points = h.means()
        if kernels.use_kernels(points):
            losses, sum_sq, tol = kernels.ifmr_losses(
                points.contiguous().numpy(), hi.numpy(), lo.numpy(), scales.numpy(),
                h.counts.contiguous().numpy(), (h.level.numpy(), h.origin.numpy()))
            best = first_min(torch.from_numpy(losses), torch.from_numpy(sum_sq))
            scale = scales.gather(1, best[:, None])[:, 0]
            self.tolerance = torch.from_numpy(tol)
        else:
            scale, _ = choose_scale(points, prefix_sums(points, h.counts), hi, lo, scales)
            self.tolerance = self._tolerance(hi, lo, scales)
        if p.asymmetric:
            return scale, asymmetric_offset(min0, scale)
        return scale, torch.zeros_like(scale, dtype=torch.int64)

    def _tolerance(self, hi, lo, scales) -> torch.Tensor:
        """2 * max over candidates of the bound on |streaming - exact| loss, per channel."""
        h = self.hist
        j_lo, j_hi = torch.round(lo / scales), torch.round(hi / scales)
        nb = int((j_hi - j_lo).max().item()) + 1
        j = j_lo[..., None] + torch.arange(nb, device=scales.device, dtype=torch.float32)
        t = ((j + 0.5) * scales[..., None]).double()
        c = t.shape[0]
        k = (torch.searchsorted(h.edges().contiguous(), t.reshape(c, -1).contiguous(), side="right") - 1)
        n = h.counts.gather(1, k.clamp(0, h.bins - 1)).reshape(t.shape)
        n = torch.where((j < j_hi[..., None]) & (k.reshape(t.shape) >= 0), n, torch.zeros_like(n))
        eps = 2.0 * scales.double() * h.width[:, None] * n.sum(-1)
        return 2.0 * eps.max(1).values


@register_observer("hfmg_stream")
class StreamingHFMGObserver(_Streaming):
    with_offsets = False  # HFMG needs counts only: half the memory
    def compute(self):
        h, bins = self.hist, self.params.num_of_bins
        lo, hi = h.lo, h.hi
        step = (hi.double() - lo.double()) / bins
        edges = lo.double()[:, None] + step[:, None] * torch.arange(bins + 1, dtype=torch.float64,
                                                                    device=lo.device)
        hist = h.cumulative_at(edges).diff(dim=1)
        # as torch.histc: a constant channel lands in the middle bin
        const = (lo == hi)[:, None]
        middle = torch.zeros_like(hist)
        middle[:, bins // 2] = h.counts.sum(1)
        hist = torch.where(const, middle, hist)
        return hfmg_factors(HistogramState(hist, lo, hi), self.params.asymmetric)


class _Gathering:
    """Exact observers for the driver: every process's values are gathered at the end."""

    def reduce(self, comm):
        if comm.active:
            mine = torch.cat(self.chunks_for_reduce()) if self.chunks_for_reduce() else \
                torch.zeros(0, self.num_channels)
            self.replace_data(comm.all_gather_cat(mine))


@register_observer("ifmr_exact")
class GatheringIFMRObserver(_Gathering, ExactIFMRObserver):
    def chunks_for_reduce(self):
        return self._chunks

    def replace_data(self, data):
        self._chunks = [data]


@register_observer("hfmg_exact")
class OneBatchHFMGObserver(_Gathering, Observer):
    """HFMG of all values as one batch (AMCT's operator fed everything at once)."""

    def __init__(self, params):
        super().__init__(params)
        self._chunks = []

    def update(self, x):
        self._chunks.append(x.to(torch.float32).clone())
        self.batches += 1

    def chunks_for_reduce(self):
        return self._chunks

    def replace_data(self, data):
        self._chunks = [data]

    def compute(self):
        obs = HFMGObserver(self.params)
        obs.update(torch.cat(self._chunks))
        self._chunks = []
        return obs.compute()
