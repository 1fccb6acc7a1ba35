"""The batches of many entries observed as one: their channels side by side.

On an accelerator an observer update is a fixed sequence of kernels (about a hundred).
Fed one entry at a time that sequence runs once per K/V entry and batch -- 64 times per
batch for an 8B model -- on small tensors, and the launches cost more than the
arithmetic. Every row (channel) of a streaming observer's statistics depends on that
row's values only, so the entries handed over with the same shapes are laid side by side
and fed to one observer of all their channels: one kernel sequence per group, whatever
the number of layers. After the last batch the group's observer is cut back into one
observer per entry (``rows``), holding exactly the statistics the entry would have had
alone.

Entries are staged as handed over (the attention's K/V states, which nothing modifies in
place afterwards), over several forwards, until :data:`STAGE_BYTES` are staged or the
statistics are read: the statistics' per-table work (the grid move of every channel's
histogram) then runs once for several batches, and the streaming statistics do not depend
on how the values were batched. The NaN/Inf check stays per entry and batch: one range
reduction per staged batch, its flags left on the device (:mod:`.deferred`). A group is
the tuple of entry names fed together; should an entry land in several groups (a batch
of another length, a module run twice in one forward), its parts are merged (``merge``)
before the solve.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import CalibrationInputError
from .deferred import DeferredChecks

__all__ = ["EntryStacks", "STAGE_BYTES"]

#: activations staged at most before they are fed (bytes as handed over, per bank)
STAGE_BYTES = 1 << 29


class EntryStacks:
    """Staging and grouped updates for the observers of one bank.

    ``make(channels, options, device)`` builds a group's observer; ``checks`` receives the NaN/Inf
    flags of every staged entry and batch."""

    def __init__(self, make: Callable[[int, dict, torch.device], object], checks: DeferredChecks,
                 stage_bytes: int = STAGE_BYTES):
        self.make, self.checks, self.stage_bytes = make, checks, stage_bytes
        self._staged: dict[str, list[tuple[torch.Tensor, tuple]]] = {}
        self._options: dict[str, dict] = {}
        self._bytes = 0
        self._groups: dict[tuple[str, ...], tuple[object, list[int]]] = {}

    def add(self, name: str, x: torch.Tensor, entry: tuple, options: dict) -> None:
        """Stage ``x`` ([rows, channels], any float dtype) of ``name``; ``entry`` is its
        ``(sequence, name, batch, dtype)`` for the NaN/Inf check, ``options`` its
        observer's construction options."""
        self._staged.setdefault(name, []).append((x, entry))
        self._options.setdefault(name, options)
        self._bytes += x.numel() * x.element_size()
        if self._bytes >= self.stage_bytes:
            self.flush()

    def flush(self) -> None:
        """Feed everything staged: one update per group of entries staged with equal shapes."""
        staged, self._staged, self._bytes = self._staged, {}, 0
        groups: dict[tuple, list[str]] = {}
        for name, items in staged.items():
            x = items[0][0]
            key = (tuple(tuple(t.shape) for t, _ in items), x.dtype, x.device)
            groups.setdefault(key, []).append(name)
        for names in groups.values():
            self._update(tuple(names), [staged[n] for n in names])

    def _update(self, names: tuple[str, ...], items: list) -> None:
        group = self._groups.get(names)
        if group is None:
            sizes = [staged[0][0].shape[1] for staged in items]
            x = items[0][0][0]
            group = self._groups[names] = (self.make(sum(sizes), self._options[names[0]], x.device), sizes)
        obs, _ = group
        batches = len(items[0])

        def side_by_side(r: int) -> torch.Tensor:
            # batch r of every entry side by side (one copy), in its own dtype (the torch path
            # promotes exactly); made again for the count, so one batch's copy is alive at a time
            return torch.cat([staged[r][0] for staged in items], 1) if len(items) > 1 else items[0][r][0]

        # one range reduction per batch gives both the NaN/Inf flags of every entry and the
        # range the grid must cover before any value is counted
        ranges = []
        for r in range(batches):
            batch = side_by_side(r)
            ranges.append(torch.stack(torch.aminmax(batch.reshape(batch.shape[0], len(names), -1), dim=0), 2))
        ends = torch.stack(ranges)  # [batches, entries, C, 2]
        flags = torch.stack([torch.isnan(ends).any((2, 3)), torch.isinf(ends).any((2, 3))], 2)
        self.checks.add([staged[r][1] for r in range(batches) for staged in items], flags.reshape(-1, 2))
        lo, hi = ends[..., 0].amin(0).reshape(-1), ends[..., 1].amax(0).reshape(-1)
        try:
            obs.update_parts((side_by_side(r) for r in range(batches)), lo.to(torch.float32), hi.to(torch.float32))
        except ValueError as err:  # the algorithm refuses these values
            self.checks.check_all()  # an earlier batch's NaN/Inf is the first fault
            raise CalibrationInputError(f"layer {names[0]!r} (one of {len(names)} updated together): {err}; "
                                        "nothing is recorded for this layer") from err

    def take(self) -> dict[str, object]:
        """One observer per entry (after the staged batches are fed), the groups emptied."""
        self.flush()
        observers: dict[str, object] = {}
        for names, (obs, sizes) in self._groups.items():
            start = 0
            for name, size in zip(names, sizes):
                part = obs.rows(start, start + size)
                start += size
                if name in observers:
                    observers[name].merge(part)
                else:
                    observers[name] = part
        self._groups.clear()
        return observers
