"""QuantCalibrationOp: the operator of the seed document (SPEC §1)."""
from __future__ import annotations

import logging
import os

import torch
from torch import nn

from .errors import CalibrationInputError
from .observers import Observer, make_observer
from .params import QuantParams, parse_quant_algo_params
from .fileio import lock_timeout_seconds
from .record import check_record_file, write_kv_factors

__all__ = ["QuantCalibrationOp", "CalibrationInputError", "as_channels", "check_activation"]

logger = logging.getLogger("amct_hf")

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_activation(layer_name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise CalibrationInputError(
            f"layer {layer_name!r}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise CalibrationInputError(
            f"layer {layer_name!r}: dtype {x.dtype} is not supported; "
            "use float32, float16 or bfloat16")
    if x.dim() == 0 or x.numel() == 0:
        raise CalibrationInputError(
            f"layer {layer_name!r}: got an empty or 0-d tensor of shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise CalibrationInputError(
            f"layer {layer_name!r}: the activation contains NaN or Inf values; "
            "nothing is recorded for this layer")


def as_channels(x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """[tokens, channels] float32 view: channel = last dim, or one channel for per-tensor."""
    x = x.detach()
    if x.dtype != torch.float32:
        x = x.to(torch.float32)
    return x.reshape(-1, x.shape[-1]) if per_channel else x.reshape(-1, 1)


class QuantCalibrationOp(nn.Module):
    """Pass-through module that calibrates INT8 factors of named activations.

    ``op(layer_name, x)`` returns ``x`` itself. The first ``batch_num`` calls for a
    name feed that name's observer; on the ``batch_num``-th the algorithm runs and
    the factors are merged into ``record_file`` (other layers' entries are kept; an
    overwritten entry is reported by a warning)."""

    def __init__(self, record_file, quant_algo_params=None, quant_method="kv_cache_quant",
                 lock_timeout=None):
        super().__init__()
        if quant_method != "kv_cache_quant":
            raise ValueError(
                f"quant_method={quant_method!r} is not supported; the only allowed value is "
                "'kv_cache_quant'")
        if not isinstance(record_file, (str, os.PathLike)) or not os.fspath(record_file):
            raise ValueError(f"record_file must be a non-empty path, got {record_file!r}")
        self.params: QuantParams = parse_quant_algo_params(quant_algo_params)
        self.record_file = os.path.abspath(os.fspath(record_file))
        if os.path.isdir(self.record_file):
            raise ValueError(f"record_file {self.record_file!r} is a directory")
        parent = os.path.dirname(self.record_file)
        if not os.path.isdir(parent):
            raise ValueError(f"record_file {self.record_file!r}: directory {parent!r} does not exist")
        # refuse an unparsable record now, before any calibration work is spent
        check_record_file(self.record_file)
        # seconds a write waits for another writer's lock (None: forever)
        self.lock_timeout = lock_timeout_seconds(lock_timeout)
        self.quant_method = quant_method
        self._observers: dict[str, Observer] = {}
        self._calls: dict[str, int] = {}
        self.factors: dict[str, tuple[list[float], list[int]]] = {}

    @property
    def batch_num(self) -> int:
        return self.params.batch_num

    def calls(self, layer_name: str) -> int:
        return self._calls.get(layer_name, 0)

    def forward(self, layer_name: str, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(layer_name, str) or not layer_name:
            raise ValueError(f"layer_name must be a non-empty str, got {layer_name!r}")
        if self._calls.get(layer_name, 0) >= self.params.batch_num:
            return x
        with torch.no_grad():
            check_activation(layer_name, x)
            batch = as_channels(x, self.params.per_channel)
            obs = self._observers.get(layer_name)
            if obs is None:
                obs = self._observers[layer_name] = make_observer(self.params)
            if obs.num_channels is None:
                obs.num_channels = batch.shape[1]
            elif obs.num_channels != batch.shape[1]:
                raise CalibrationInputError(
                    f"layer {layer_name!r}: {batch.shape[1]} channels (last dim of shape "
                    f"{tuple(x.shape)}) but earlier batches had {obs.num_channels}")
            obs.update(batch)
            self._calls[layer_name] = obs.batches
            if obs.batches == self.params.batch_num:
                del self._observers[layer_name]
                scales, offsets = obs.compute()
                self._record(layer_name, scales, offsets)
        return x

    def _record(self, layer_name, scales, offsets):
        entry = ([float(s) for s in scales.cpu().tolist()], [int(o) for o in offsets.cpu().tolist()])
        self.factors[layer_name] = entry
        write_kv_factors(self.record_file, {layer_name: entry}, lock_timeout=self.lock_timeout)
        logger.info("calibrated %s: %d channel(s) written to %s", layer_name, len(entry[0]),
                    self.record_file)

    def extra_repr(self) -> str:
        return f"record_file={self.record_file!r}, params={self.params.to_dict()}"
