"""The observer interface, its registry, and the one sink every calibration path uses.

An observer holds the statistics of one record key ([tokens, channels] float32 batches)
and turns them into scales and offsets. Observers are registered per (algorithm, mode):

* ``"amct"``: the operator's semantics, batch by batch as AMCT computes them (HFMG
  merges its histogram batch by batch, so the result depends on the batch order);
* ``"exact"``: every value kept; the factors of all values fed as one batch;
* ``"streaming"``: bounded memory, mergeable in any order and across processes.

Each observer declares how its statistics reduce across processes (:meth:`Observer.reduce`),
so the driver reduces once per layer after the last batch.

:class:`LayerBank` is the sink of both :class:`~amct_hf.op.QuantCalibrationOp` and the
driver: it checks every activation (:func:`check_activation`), shapes it
(:func:`as_channels`), checks the channel count, feeds the layer's observer and checks
the factors it computes.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch

from ..algorithms import kernels
from ..algorithms.convention import factor_problem
from ..errors import CalibrationInputError, InvalidArgumentError
from ..settings.quant_params import QuantParams
from .deferred import DeferredChecks, activation_flags, bad_values_error
from .stacked import EntryStacks

__all__ = ["Observer", "OBSERVERS", "MODES", "register_observer", "make_observer",
           "check_activation", "as_channels", "LayerBank"]

MODES = ("amct", "exact", "streaming")
OBSERVERS: dict[tuple[str, str], type[Observer]] = {}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
logger = logging.getLogger("amct_hf")


def register_observer(algorithm: str, *modes: str) -> Callable[[type], type]:
    def wrap(cls):
        for mode in modes:
            if mode not in MODES:
                raise ValueError(f"unknown observer mode {mode!r}")
            OBSERVERS[(algorithm, mode)] = cls
        return cls
    return wrap


class Observer(ABC):
    """Statistics of one record key."""

    #: how :meth:`reduce` combines processes' statistics, for documentation and messages
    reduction: ClassVar[str] = "none"

    def __init__(self, params: QuantParams, channels: int, device=None):
        self.params = params
        self.num_channels = channels
        self.device = device
        self.batches = 0
        #: IFMR streaming bound on the exact loss (per channel), or None where exact
        self.tolerance: torch.Tensor | None = None

    @abstractmethod
    def update(self, x: torch.Tensor) -> None:
        """Add one batch, already shaped [tokens, channels] and float32."""

    @abstractmethod
    def reduce(self, comm) -> None:
        """Combine every process's statistics (collective: all ranks call it)."""

    @abstractmethod
    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scales float32 [C], offsets int64 [C]) from everything seen."""

    def check(self) -> None:  # noqa: B027 -- most observers have nothing to refuse before the solve
        """ValueError for statistics no solve can use (before a class's ``compute_many``)."""


def make_observer(params: QuantParams, mode: str, channels: int, device=None, **options) -> Observer:
    try:
        cls = OBSERVERS[(params.act_algo, mode)]
    except KeyError:
        known = ", ".join(f"{a}/{m}" for a, m in sorted(OBSERVERS))
        raise InvalidArgumentError(
            f"no observer for act_algo={params.act_algo!r} in mode={mode!r}; known: {known}") from None
    return cls(params, channels, device, **options)


def check_activation(layer_name: str, x, batch: int | None = None, values: bool = True) -> None:
    """Refuse what no algorithm can use, naming the layer (and the batch, 1-based).
    ``values=False`` checks the metadata only (the NaN/Inf check is then the caller's,
    see :mod:`amct_hf.observers.deferred`)."""
    at = f"layer {layer_name!r}" + (f", batch {batch}" if batch is not None else "")
    if not isinstance(x, torch.Tensor):
        raise CalibrationInputError(f"{at}: expected a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise CalibrationInputError(f"{at}: {x.layout} tensors are not supported; pass a dense tensor")
    if x.is_meta:
        raise CalibrationInputError(
            f"{at}: the activation is on the meta device (no data); are the weights loaded?")
    if x.dtype not in _DTYPES:
        raise CalibrationInputError(
            f"{at}: dtype {x.dtype} is not supported; use float32, float16 or bfloat16")
    if x.dim() == 0 or x.numel() == 0:
        raise CalibrationInputError(f"{at}: got an empty or 0-d tensor of shape {tuple(x.shape)}")
    if not values:
        return
    # min and max propagate NaN and are Inf if any value is: one cheap reduction (a
    # separate isfinite() pass costs ~40x more) decides, the details only on failure
    lo, hi = torch.aminmax(x.detach())
    if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
        kind = " and ".join(k for k, found in (("NaN", torch.isnan(x).any()),
                                                ("Inf", torch.isinf(x).any())) if bool(found))
        raise bad_values_error(at, x.dtype, kind)


def as_channels(x: torch.Tensor, per_channel: bool, dtype=torch.float32) -> torch.Tensor:
    """[tokens, channels] view: channel = last dim, or one channel for per-tensor; in
    ``dtype`` (None: as given)."""
    x = x.detach()
    if dtype is not None and x.dtype != dtype:
        x = x.to(dtype)
    return x.reshape(-1, x.shape[-1]) if per_channel else x.reshape(-1, 1)


def _as_lists(name: str, scales: torch.Tensor, offsets: torch.Tensor) -> tuple[list[float], list[int]]:
    s = [float(v) for v in scales.cpu().tolist()]
    o = [int(v) for v in offsets.cpu().tolist()]
    problem = factor_problem(s, o)
    if problem:
        raise CalibrationInputError(
            f"layer {name!r}: the algorithm produced unusable factors ({problem}); "
            "nothing is recorded for this layer")
    return s, o


class LayerBank:
    """One observer per record key; ``bank(name, x)`` adds a batch of activations.

    ``tokens``: the number of calibration tokens every key will see over all processes,
    where known in advance (the driver): observers that size buffers by it get the count
    of values per channel (IFMR streaming: its exact extremes).

    ``defer_checks`` (the driver): on the torch (accelerator) path nothing is read back to
    the host per batch. The NaN/Inf check stays on the device (:mod:`.deferred`; the
    error still names the first bad layer and batch, :meth:`check_pending` reads what is
    left), and the entries of one forward are updated together where the observer allows
    it (:mod:`.stacked`: one kernel sequence per group of entries and several batches instead
    of one per entry and batch). The compiled CPU path checks and updates each
    batch at once either way. ``checks``: the deferred checks to share with another bank
    of the same run; ``once``: a set shared likewise, so that a note is logged once per run."""

    def __init__(self, params: QuantParams, mode: str, *, tokens: int | None = None,
                 defer_checks: bool = False, once: set | None = None, checks: DeferredChecks | None = None,
                 **options):
        if mode not in MODES:
            raise InvalidArgumentError(f"mode={mode!r} is not supported; use one of {MODES}")
        self.params, self.mode, self.options = params, mode, options
        self.tokens, self.defer_checks = tokens, defer_checks
        self.once = set() if once is None else once
        self.checks = checks if checks is not None else DeferredChecks()
        self.observers: dict[str, Observer] = {}
        self._fed: dict[str, int] = {}       # batches handed over per key
        self._channels: dict[str, int] = {}  # channels per key, from its first batch
        cls = OBSERVERS.get((params.act_algo, mode))
        self.stacks = EntryStacks(self._make_group, self.checks) \
            if defer_checks and getattr(cls, "stackable", False) else None

    def batches(self, name: str) -> int:
        return self._fed.get(name, 0)

    def flush(self) -> None:
        """Feed the batches staged for grouped updates."""
        if self.stacks is not None:
            self.stacks.flush()

    def check_pending(self) -> None:
        """Feed what is staged, read every deferred NaN/Inf flag and raise for the first
        bad layer batch in feeding order (waits for flags still on their way to the host)."""
        self.flush()
        self.checks.check_all()

    def _observer_options(self, batch: torch.Tensor, tokens: int | None) -> dict:
        options = dict(self.options)
        cls = OBSERVERS.get((self.params.act_algo, self.mode))
        if self.tokens is not None and tokens and getattr(cls, "sized_by_count", False):
            # values per channel per token (per-tensor: the layer width; a channel group: its size)
            options["expected_count"] = self.tokens * batch.shape[0] // tokens
            options["entry_channels"] = batch.shape[1]
        return options

    def _make_group(self, channels: int, options: dict, device: torch.device) -> Observer:
        return make_observer(self.params, self.mode, channels, device, **options)

    def __call__(self, name: str, x: torch.Tensor, tokens: int | None = None) -> None:
        """Add ``x`` (its last dim the channels). ``tokens``: how many calibration tokens
        ``x`` holds (default: every row of ``x`` but the last dim is one token)."""
        batch_no = self._fed.get(name, 0) + 1
        device_path = self.defer_checks and isinstance(x, torch.Tensor) and not kernels.use_kernels(x)
        if device_path:
            check_activation(name, x, batch_no, values=False)
        else:
            check_activation(name, x, batch_no)
        with torch.no_grad():
            batch = as_channels(x, self.params.per_channel, dtype=None if device_path else torch.float32)
            channels = self._channels.setdefault(name, batch.shape[1])
            if channels != batch.shape[1]:
                raise CalibrationInputError(
                    f"layer {name!r}: {batch.shape[1]} channels (last dim of shape "
                    f"{tuple(x.shape)}) but earlier batches had {channels}")
            if tokens is None:
                tokens = x.numel() // x.shape[-1]
            self._fed[name] = batch_no
            entry = (self.checks.next_sequence(), name, batch_no, x.dtype)
            if device_path and self.stacks is not None:
                self.stacks.add(name, batch, entry, self._observer_options(batch, tokens))
                return
            if device_path:
                self.checks.add([entry], activation_flags(x))
                batch = batch.to(torch.float32)
            obs = self.observers.get(name)
            if obs is None:
                obs = self.observers[name] = make_observer(
                    self.params, self.mode, batch.shape[1], batch.device,
                    **self._observer_options(batch, tokens))
            try:
                obs.update(batch)
            except ValueError as err:  # the algorithm refuses these values
                self.check_pending()  # an earlier batch's NaN/Inf is the first fault
                raise CalibrationInputError(f"layer {name!r}: {err}; nothing is recorded for this "
                                            "layer") from err

    def _forget(self, name: str) -> None:
        """The key starts again from its first batch (its statistics are being dropped)."""
        self._fed.pop(name, None)
        self._channels.pop(name, None)

    def _take_stacks(self) -> None:
        """Cut the grouped observers back into one per entry (before any solve)."""
        if self.stacks is None:
            return
        self.flush()
        for name, obs in self.stacks.take().items():
            if name in self.observers:
                self.observers[name].merge(obs)
            else:
                self.observers[name] = obs

    def finalize(self, name: str, comm=None) -> tuple[tuple[list[float], list[int]], float | None]:
        """The layer's factors and its IFMR streaming tolerance (max over channels, None
        where exact). Its statistics are dropped either way, so a failed layer can be
        calibrated again from scratch."""
        self.check_pending()
        self._take_stacks()
        obs = self.observers.pop(name)
        self._forget(name)
        with torch.no_grad():
            if comm is not None:
                obs.reduce(comm)
            try:
                scales, offsets = obs.compute()
            except ValueError as err:  # the algorithm refuses these values
                raise CalibrationInputError(f"layer {name!r}: {err}; nothing is recorded for this "
                                            "layer") from err
        self._note_inexact_extremes(name, obs)
        tolerance = None if obs.tolerance is None else float(obs.tolerance.max())
        return _as_lists(name, scales, offsets), tolerance

    def _note_inexact_extremes(self, name: str, obs: Observer) -> None:
        if getattr(obs, "extremes_exact", None) is False and "inexact_extremes" not in self.once:
            self.once.add("inexact_extremes")
            logger.warning(
                "IFMR: the percentile rank among the %d values per channel of %r (and possibly later "
                "entries) is beyond the %d exact extremes kept; reading it from the histogram (said "
                "once per run). Pass the token count (the driver does) to keep enough extremes.",
                obs.count, name, obs.topk)

    def finalize_all(self, comm, order: Callable[[list], list] = sorted) -> tuple[dict, dict]:
        """Reduce across processes and solve every layer seen by any process; the same
        result on every rank. A rank that saw no token of a layer (uneven split) joins
        the reduction with empty statistics."""
        self.check_pending()
        self._take_stacks()
        # channels, and the extreme buffers' size where the observer has one (every rank's
        # buffers must match for the reduction)
        layers = {n: (o.num_channels, getattr(o, "topk", None)) for n, o in self.observers.items()}
        if comm.active:
            merged: dict = {}
            for seen in comm.gather_object(layers):  # rank order: the same on every rank
                for n, c in seen.items():
                    merged.setdefault(n, c)
            layers = merged
        factors, tolerance = {}, {}
        names = order(list(layers))
        for name in names:
            self._forget(name)
            if name not in self.observers:
                channels, topk = layers[name]
                self.observers[name] = make_observer(self.params, self.mode, channels, None,
                                                     **self.options, **({"topk": topk} if topk else {}))
        many = getattr(OBSERVERS.get((self.params.act_algo, self.mode)), "compute_many", None)
        if many is not None:
            return self._finalize_many(names, comm, many)
        for name in names:
            factors[name], bound = self.finalize(name, comm)
            if bound is not None:
                tolerance[name] = bound
        return factors, tolerance

    def _finalize_many(self, names: list, comm, many) -> tuple[dict, dict]:
        """Every entry reduced (in ``names`` order, on every rank), checked, then solved
        together by the observer class's ``compute_many``: (factors, IFMR tolerances)."""
        observers = [self.observers.pop(name) for name in names]
        with torch.no_grad():
            for name, obs in zip(names, observers):
                obs.reduce(comm)
                try:
                    obs.check()
                except ValueError as err:
                    raise CalibrationInputError(f"layer {name!r}: {err}; nothing is recorded for this "
                                                "layer") from err
            results = many(observers)
        tolerance = {}
        for name, obs in zip(names, observers):
            self._note_inexact_extremes(name, obs)
            if obs.tolerance is not None:
                tolerance[name] = float(obs.tolerance.max())
        return {name: _as_lists(name, s, o) for name, (s, o) in zip(names, results)}, tolerance
