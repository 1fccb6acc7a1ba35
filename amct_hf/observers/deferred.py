"""The NaN/Inf check of the accelerator path: flags left on the device, read back later.

Reading a flag on the host waits for every kernel queued before it, so checking each
batch at once would stall the forward once per K/V entry. Instead each check leaves a small
bool tensor on the device; every :attr:`DeferredChecks.check_every` entries the flags are
copied to the host without blocking (CUDA: pinned memory and an event) and looked at once
they have arrived. The first bad entry in feeding order is named (sequence numbers, not
list order: key and value entries of one run are flagged by different banks), with its
layer and batch, before anything is written.
"""
from __future__ import annotations

import itertools

import torch

from ..errors import CalibrationInputError

__all__ = ["DeferredChecks", "activation_flags", "bad_values_error"]


def activation_flags(x: torch.Tensor) -> torch.Tensor:
    """[1, 2] bool on ``x``'s device: (any NaN, any Inf). min and max propagate NaN and are
    Inf if any value is, so one reduction decides (where both occur it says NaN)."""
    lo, hi = torch.aminmax(x.detach())
    ends = torch.stack([lo, hi])
    return torch.stack([torch.isnan(ends).any(), torch.isinf(ends).any()])[None]


def bad_values_error(at: str, dtype, kind: str) -> CalibrationInputError:
    hint = ""
    if dtype in (torch.float16, torch.bfloat16):
        other = "float32 or bfloat16" if dtype == torch.float16 else "float32"
        hint = f" ({dtype} overflow? load the model in {other})"
    return CalibrationInputError(
        f"{at}: the activation contains {kind} values{hint}; nothing is recorded for this layer")


class DeferredChecks:
    """Deferred NaN/Inf flags of one run (shared by the key and value banks).

    :meth:`add` takes the entries of one check -- ``(sequence, layer name, batch, dtype)``
    each -- and their ``[E, 2]`` flags; :meth:`check_all` reads whatever is left and raises
    for the first bad entry."""

    #: flags are sent to the host after this many entries (one non-blocking copy each time)
    check_every = 256

    def __init__(self):
        self._sequence = itertools.count()
        self._blocks: list[tuple[list, torch.Tensor]] = []
        self._entries = 0
        self._inflight: list = []  # (entries, host flags, event): copies not yet looked at

    def next_sequence(self) -> int:
        """The feeding order of an activation, taken when it is handed over."""
        return next(self._sequence)

    def add(self, entries: list, flags: torch.Tensor) -> None:
        self._blocks.append((entries, flags))
        self._entries += len(entries)
        self._poll(wait=False)
        if self._entries >= self.check_every:
            self._ship()

    def check_all(self) -> None:
        """Read every flag (waiting for those on their way) and raise for the first bad entry."""
        self._ship()
        self._poll(wait=True)

    def _ship(self) -> None:
        blocks, self._blocks, self._entries = self._blocks, [], 0
        if not blocks:
            return
        entries = [e for block, _ in blocks for e in block]
        flags = torch.cat([f for _, f in blocks]) if len(blocks) > 1 else blocks[0][1]
        if flags.device.type != "cuda":
            _raise_first(entries, flags.cpu())
            return
        host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
        host.copy_(flags, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._inflight.append((entries, host, event))

    def _poll(self, wait: bool) -> None:
        while self._inflight:
            entries, host, event = self._inflight[0]
            if not wait and not event.query():
                return
            event.synchronize()
            self._inflight.pop(0)
            _raise_first(entries, host)


def _raise_first(entries: list, flags: torch.Tensor) -> None:
    bad = flags.any(1)
    if not bool(bad.any()):
        return
    i = min((int(i) for i in torch.nonzero(bad)[:, 0]), key=lambda i: entries[i][0])
    _, name, batch, dtype = entries[i]
    kind = "NaN" if bool(flags[i, 0]) else "Inf"
    raise bad_values_error(f"layer {name!r}, batch {batch}", dtype, kind)
