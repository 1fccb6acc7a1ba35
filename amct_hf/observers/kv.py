"""A calibration sink with its own settings for keys and for values, and channel groups.

:class:`KVBank` routes every record key to a key bank or a value bank (each a
:class:`~amct_hf.observers.base.LayerBank` with its own algorithm parameters), reshaping
per-channel batches by the kind's channel grouping
(:mod:`amct_hf.algorithms.grouping`) first, so the observers see one "channel" per
group; after the reduction the group factors are expanded back onto every channel.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..algorithms.grouping import check_channel_groups, expand_groups, group_channels
from ..errors import CalibrationInputError, InvalidArgumentError
from ..naming import layer_kind
from ..settings.quant_params import QuantParams
from .base import LayerBank
from .deferred import DeferredChecks

__all__ = ["KVBank", "KINDS"]

KINDS = ("key", "value")


class KVBank:
    """``bank(name, x)`` with ``x`` ``[tokens, kv_heads * head_dim]``; ``params`` and
    ``groups`` map ``"key"``/``"value"`` to that kind's settings, as a validated
    :class:`~amct_hf.settings.presets.KVSettings` holds them (not checked again here)."""

    def __init__(self, params: dict[str, QuantParams], mode: str, groups: dict[str, str],
                 head_dim: int | None = None, *, tokens: int | None = None, defer_checks: bool = False,
                 **options):
        if set(params) != set(KINDS) or set(groups) != set(KINDS):
            raise InvalidArgumentError(f"KVBank needs settings for exactly {KINDS}")
        self.params, self.groups, self.head_dim = dict(params), dict(groups), head_dim
        once: set = set()
        # one set of deferred NaN/Inf checks, so the first bad batch of either kind is named
        self.checks = DeferredChecks()
        self.banks = {kind: LayerBank(params[kind], mode, tokens=tokens, defer_checks=defer_checks,
                                      once=once, checks=self.checks, **options) for kind in KINDS}

    def flush(self) -> None:
        """Feed the batches staged for grouped updates."""
        for bank in self.banks.values():
            bank.flush()

    def check_pending(self) -> None:
        """Raise for the first layer batch whose deferred NaN/Inf check failed."""
        self.flush()
        self.checks.check_all()

    def __call__(self, name: str, x: torch.Tensor) -> None:
        kind = layer_kind(name)
        groups = self.groups[kind]
        tokens = x.numel() // x.shape[-1] if isinstance(x, torch.Tensor) and x.dim() and x.shape[-1] else None
        if groups != "channel" and isinstance(x, torch.Tensor) and x.dim() == 2:
            try:
                check_channel_groups(groups, x.shape[1], self.head_dim)
            except ValueError as err:
                raise CalibrationInputError(f"layer {name!r}: {err}") from None
            x = group_channels(x, groups, self.head_dim)
        self.banks[kind](name, x, tokens=tokens)

    def finalize_all(self, comm, order: Callable[[list], list] = sorted) -> tuple[dict, dict]:
        """Both banks reduced and solved (collective, same order on every rank), group
        factors expanded to channels, entries in ``order``."""
        self.check_pending()
        factors, tolerance = {}, {}
        for kind in KINDS:
            got, bound = self.banks[kind].finalize_all(comm, order=order)
            for name, (scales, offsets) in got.items():
                if self.groups[kind] != "channel":
                    channels = self._channels(self.groups[kind], len(scales))
                    scales = expand_groups(torch.tensor(scales, dtype=torch.float64), self.groups[kind],
                                           channels, self.head_dim).tolist()
                    offsets = [int(o) for o in expand_groups(torch.tensor(offsets), self.groups[kind],
                                                             channels, self.head_dim).tolist()]
                factors[name] = (scales, offsets)
            tolerance.update(bound)
        return {name: factors[name] for name in order(list(factors))}, tolerance

    def _channels(self, groups: str, num_groups: int) -> int:
        # from the group count, so a rank that saw no token of the layer agrees too
        return num_groups * (self.head_dim if groups == "head" else 2)
