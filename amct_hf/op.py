"""QuantCalibrationOp: the operator of the seed document (SPEC §1)."""
from __future__ import annotations

import logging
import os

import torch
from torch import nn

from .observers import LayerBank
from .record.files import check_record_file, write_kv_factors
from .settings.quant_params import QuantParams, parse_quant_algo_params
from .settings.validate import lock_timeout_seconds

__all__ = ["QuantCalibrationOp"]

logger = logging.getLogger("amct_hf")


class QuantCalibrationOp(nn.Module):
    """Pass-through module that calibrates INT8 factors of named activations.

    ``op(layer_name, x)`` returns ``x`` itself. The first ``batch_num`` calls for a
    name feed that name's observer; on the ``batch_num``-th the algorithm runs and
    the factors are merged into ``record_file`` (other layers' entries are kept; an
    overwritten entry is reported by a warning). A batch or a result that cannot be
    used raises :class:`~amct_hf.errors.CalibrationInputError`: a refused batch leaves the
    layer's statistics as they were; after a failed solve or write the layer starts again
    from its first batch."""

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
        self._bank = LayerBank(self.params, "amct")
        self._done: set[str] = set()
        self.factors: dict[str, tuple[list[float], list[int]]] = {}

    @property
    def batch_num(self) -> int:
        return self.params.batch_num

    def calls(self, layer_name: str) -> int:
        """Batches taken for ``layer_name`` so far (``batch_num`` once it is calibrated)."""
        return self.params.batch_num if layer_name in self._done else self._bank.batches(layer_name)

    def forward(self, layer_name: str, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(layer_name, str) or not layer_name:
            raise ValueError(f"layer_name must be a non-empty str, got {layer_name!r}")
        if layer_name in self._done:
            return x
        self._bank(layer_name, x)  # a refused batch leaves the layer's statistics as they were
        if self._bank.batches(layer_name) == self.params.batch_num:
            entry, _ = self._bank.finalize(layer_name)
            write_kv_factors(self.record_file, {layer_name: entry}, lock_timeout=self.lock_timeout)
            self._done.add(layer_name)
            self.factors[layer_name] = entry
            logger.info("calibrated %s: %d channel(s) written to %s", layer_name,
                        len(entry[0]), self.record_file)
        return x

    def extra_repr(self) -> str:
        return f"record_file={self.record_file!r}, params={self.params.to_dict()}"
