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

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch

from ..algorithms.convention import factor_problem
from ..errors import CalibrationInputError, InvalidArgumentError
from ..settings.quant_params import QuantParams

__all__ = ["Observer", "OBSERVERS", "MODES", "register_observer", "make_observer",
           "check_activation", "as_channels", "LayerBank"]

MODES = ("amct", "exact", "streaming")
OBSERVERS: dict[tuple[str, str], type[Observer]] = {}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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


def make_observer(params: QuantParams, mode: str, channels: int, device=None, **options) -> Observer:
    try:
        cls = OBSERVERS[(params.act_algo, mode)]
    except KeyError:
        known = ", ".join(f"{a}/{m}" for a, m in sorted(OBSERVERS))
        raise InvalidArgumentError(
            f"no observer for act_algo={params.act_algo!r} in mode={mode!r}; known: {known}") from None
    return cls(params, channels, device, **options)


def check_activation(layer_name: str, x, batch: int | None = None) -> None:
    """Refuse what no algorithm can use, naming the layer (and the batch, 1-based)."""
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
    # min and max propagate NaN and are Inf if any value is: one cheap reduction (a
    # separate isfinite() pass costs ~40x more) decides, the details only on failure
    lo, hi = torch.aminmax(x.detach())
    if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
        kind = " and ".join(k for k, found in (("NaN", torch.isnan(x).any()),
                                                ("Inf", torch.isinf(x).any())) if bool(found))
        hint = ""
        if x.dtype in (torch.float16, torch.bfloat16):
            other = "float32 or bfloat16" if x.dtype == torch.float16 else "float32"
            hint = f" ({x.dtype} overflow? load the model in {other})"
        raise CalibrationInputError(
            f"{at}: the activation contains {kind} values{hint}; nothing is recorded for this layer")


def as_channels(x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """[tokens, channels] float32 view: channel = last dim, or one channel for per-tensor."""
    x = x.detach()
    if x.dtype != torch.float32:
        x = x.to(torch.float32)
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
    """One observer per record key; ``bank(name, x)`` adds a batch of activations."""

    def __init__(self, params: QuantParams, mode: str, **options):
        if mode not in MODES:
            raise InvalidArgumentError(f"mode={mode!r} is not supported; use one of {MODES}")
        self.params, self.mode, self.options = params, mode, options
        self.observers: dict[str, Observer] = {}

    def batches(self, name: str) -> int:
        obs = self.observers.get(name)
        return obs.batches if obs is not None else 0

    def __call__(self, name: str, x: torch.Tensor) -> None:
        obs = self.observers.get(name)
        check_activation(name, x, (obs.batches if obs is not None else 0) + 1)
        with torch.no_grad():
            batch = as_channels(x, self.params.per_channel)
            if obs is None:
                obs = self.observers[name] = make_observer(
                    self.params, self.mode, batch.shape[1], batch.device, **self.options)
            elif obs.num_channels != batch.shape[1]:
                raise CalibrationInputError(
                    f"layer {name!r}: {batch.shape[1]} channels (last dim of shape "
                    f"{tuple(x.shape)}) but earlier batches had {obs.num_channels}")
            try:
                obs.update(batch)
            except ValueError as err:  # the algorithm refuses these values
                raise CalibrationInputError(f"layer {name!r}: {err}; nothing is recorded for this "
                                            "layer") from err

    def finalize(self, name: str, comm=None) -> tuple[tuple[list[float], list[int]], float | None]:
        """The layer's factors and its IFMR streaming tolerance (max over channels, None
        where exact). Its statistics are dropped either way, so a failed layer can be
        calibrated again from scratch."""
        obs = self.observers.pop(name)
        with torch.no_grad():
            if comm is not None:
                obs.reduce(comm)
            try:
                scales, offsets = obs.compute()
            except ValueError as err:  # the algorithm refuses these values
                raise CalibrationInputError(f"layer {name!r}: {err}; nothing is recorded for this "
                                            "layer") from err
        tolerance = None if obs.tolerance is None else float(obs.tolerance.max())
        return _as_lists(name, scales, offsets), tolerance

    def finalize_all(self, comm, order: Callable[[list], list] = sorted) -> tuple[dict, dict]:
        """Reduce across processes and solve every layer seen by any process; the same
        result on every rank. A rank that saw no token of a layer (uneven split) joins
        the reduction with empty statistics."""
        layers = {n: o.num_channels for n, o in self.observers.items()}
        if comm.active:
            merged: dict = {}
            for seen in comm.gather_object(layers):  # rank order: the same on every rank
                for n, c in seen.items():
                    merged.setdefault(n, c)
            layers = merged
        factors, tolerance = {}, {}
        for name in order(list(layers)):
            if name not in self.observers:
                self.observers[name] = make_observer(self.params, self.mode, layers[name], None,
                                                     **self.options)
            factors[name], bound = self.finalize(name, comm)
            if bound is not None:
                tolerance[name] = bound
        return factors, tolerance
