"""One observer class per calibration algorithm, under a string registry.

An observer accumulates the statistics of one layer ([tokens, channels] batches)
and turns them into scales and offsets. The operator keeps one per layer name.
"""
from __future__ import annotations

from typing import Callable, Dict, Type

import torch

from .algorithms.hfmg import HistogramState, hfmg_factors
from .algorithms.ifmr import ifmr_factors
from .params import QuantParams

__all__ = ["Observer", "ExactIFMRObserver", "HFMGObserver", "OBSERVERS", "register_observer",
           "make_observer"]

OBSERVERS: Dict[str, Type["Observer"]] = {}


def register_observer(name: str) -> Callable[[type], type]:
    def wrap(cls):
        OBSERVERS[name] = cls
        cls.name = name
        return cls
    return wrap


class Observer:
    name = "base"

    def __init__(self, params: QuantParams):
        self.params = params
        self.num_channels: int | None = None
        self.batches = 0

    def update(self, x: torch.Tensor) -> None:
        """Add one batch, already shaped [tokens, channels] and float32."""
        raise NotImplementedError

    def compute(self):
        """(scales float32 [C], offsets int64 [C]) from everything seen."""
        raise NotImplementedError


@register_observer("ifmr")
class ExactIFMRObserver(Observer):
    """Keeps every value, as AMCT does, and runs exact IFMR at the end.

    Memory grows with the number of calibration tokens; the driver's streaming
    observers do not."""

    def __init__(self, params):
        super().__init__(params)
        self._chunks: list[torch.Tensor] = []

    def update(self, x):
        self._chunks.append(x.to(torch.float32).clone())
        self.batches += 1

    def compute(self):
        data = torch.cat(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        self._chunks = []
        p = self.params
        return ifmr_factors(data, p.asymmetric, p.max_percentile, p.min_percentile,
                            p.search_range, p.search_step)


@register_observer("hfmg")
class HFMGObserver(Observer):
    """Histogram per channel, merged batch by batch as AMCT merges them."""

    def __init__(self, params):
        super().__init__(params)
        self.state: HistogramState | None = None

    def update(self, x):
        if self.state is None:
            self.state = HistogramState.from_batch(x, self.params.num_of_bins)
        else:
            self.state.update(x)
        self.batches += 1

    def compute(self):
        state, self.state = self.state, None
        return hfmg_factors(state, self.params.asymmetric)


def make_observer(params: QuantParams, kind: str | None = None, **kwargs) -> Observer:
    if kind and kind not in OBSERVERS:
        from . import streaming  # noqa: F401  (registers the driver's observers)
    return OBSERVERS[kind or params.act_algo](params, **kwargs)
