"""Observers that keep what the algorithm needs exactly: every value (IFMR; HFMG of all
values as one batch) or AMCT's batch-by-batch HFMG histogram (the operator's semantics).
"""
from __future__ import annotations

import torch

from ..algorithms.hfmg import HistogramState, hfmg_factors
from ..algorithms.ifmr import ifmr_factors
from .base import Observer, register_observer

__all__ = ["ValuesObserver", "ExactIFMRObserver", "BatchwiseHFMGObserver", "OneBatchHFMGObserver"]


class ValuesObserver(Observer):
    """Keeps every value; across processes the values are gathered (rank order).

    Memory grows with the number of calibration tokens, as in AMCT."""

    reduction = "gather every value"

    def __init__(self, params, channels, device=None):
        super().__init__(params, channels, device)
        self._chunks: list[torch.Tensor] = []

    def update(self, x):
        self._chunks.append(x.to(torch.float32).clone())
        self.batches += 1

    def values(self) -> torch.Tensor:
        if not self._chunks:
            return torch.zeros(0, self.num_channels, device=self.device)
        return torch.cat(self._chunks) if len(self._chunks) > 1 else self._chunks[0]

    def reduce(self, comm):
        if comm.active:
            self._chunks = [comm.all_gather_cat(self.values())]

    def take_values(self) -> torch.Tensor:
        data, self._chunks = self.values(), []
        return data


@register_observer("ifmr", "amct", "exact")
class ExactIFMRObserver(ValuesObserver):
    """Exact IFMR over every value seen (AMCT's operator, and the driver's exact mode)."""

    def compute(self):
        p = self.params
        return ifmr_factors(self.take_values(), p.asymmetric, p.max_percentile, p.min_percentile,
                            p.search_range, p.search_step)


@register_observer("hfmg", "exact")
class OneBatchHFMGObserver(ValuesObserver):
    """HFMG of all values as one batch (AMCT's operator fed everything at once)."""

    def compute(self):
        state = HistogramState.from_batch(self.take_values(), self.params.num_of_bins)
        return hfmg_factors(state, self.params.asymmetric)


@register_observer("hfmg", "amct")
class BatchwiseHFMGObserver(Observer):
    """Histogram per channel, merged batch by batch as AMCT merges them. The merge
    depends on the batch order, so there is no cross-process reduction."""

    reduction = "none (batch order matters)"

    def __init__(self, params, channels, device=None):
        super().__init__(params, channels, device)
        self.state: HistogramState | None = None

    def update(self, x):
        if self.state is None:
            self.state = HistogramState.from_batch(x, self.params.num_of_bins)
        else:
            self.state.update(x)
        self.batches += 1

    def reduce(self, comm):
        if comm.active:
            raise RuntimeError("AMCT's batch-by-batch HFMG cannot be reduced across processes; "
                               "use mode='exact' or 'streaming'")

    def compute(self):
        state, self.state = self.state, None
        return hfmg_factors(state, self.params.asymmetric)
