"""Running per-channel minimum and maximum of every layer: the min-max reference the
evaluation scores a record against (an oracle when fitted on the evaluation text)."""
from __future__ import annotations

import torch

from ..algorithms.convention import minmax_factors

__all__ = ["MinMaxRanges"]


class MinMaxRanges:
    """``ranges(name, x)`` with ``x`` ``[tokens, channels]`` (a ``kv_calibration``
    observer); :meth:`factors` gives min-max INT8 factors per layer."""

    def __init__(self):
        self.lo: dict[str, torch.Tensor] = {}
        self.hi: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, x: torch.Tensor) -> None:
        x = x.detach().float()
        lo, hi = x.amin(0), x.amax(0)
        if name in self.lo:
            lo, hi = torch.minimum(lo, self.lo[name]), torch.maximum(hi, self.hi[name])
        self.lo[name], self.hi[name] = lo, hi

    def factors(self, like: dict) -> dict:
        """Min-max factors with the granularity of ``like`` (a record: one scale per layer
        or one per channel), per layer."""
        out = {}
        for name, (scales, _) in like.items():
            lo, hi = self.lo[name], self.hi[name]
            if len(scales) == 1:
                lo, hi = lo.min().reshape(1), hi.max().reshape(1)
            s, o = minmax_factors(lo, hi)
            out[name] = (s.cpu(), o.cpu())
        return out
