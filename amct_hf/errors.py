"""Every error and warning type of amct_hf, under one base.

Each keeps the builtin parent it always had (``except ValueError`` keeps working) and
adds :class:`AmctHfError`, so a caller (the CLI) can tell a refusal of the user's input
from a bug: an ``AmctHfError`` carries a one-line message meant for the user.
"""
from __future__ import annotations

__all__ = [
    "AmctHfError", "QuantParamsError", "CalibrationInputError", "RecordFileError",
    "RecordMismatchError", "UnpatchableModelError", "AssetNotFoundError", "ModelLoadError",
    "DatasetError", "ExportError", "InvalidArgumentError", "MissingFileError", "OutputPathError",
    "RecordOverwriteWarning", "DependencyVersionError",
]


class AmctHfError(Exception):
    """Base of every error amct_hf raises on purpose (bad input, unusable file or model)."""


class QuantParamsError(AmctHfError, ValueError):
    """A ``quant_algo_params`` field is unknown, of the wrong type or out of range."""


class CalibrationInputError(AmctHfError, RuntimeError):
    """A calibration batch cannot be used (dtype, NaN/Inf, shape, channel count)."""


class RecordFileError(AmctHfError, ValueError):
    """A record file cannot be read, parsed or written, or holds unusable factors."""


class RecordMismatchError(AmctHfError, ValueError):
    """A record does not fit the model it is applied to (names, channel counts, factors)."""


class UnpatchableModelError(AmctHfError, RuntimeError):
    """The model's attention cannot be routed through the calibration hooks."""


class AssetNotFoundError(AmctHfError, RuntimeError):
    """A bundled asset (model, corpus) is not installed."""


class ModelLoadError(AmctHfError, OSError):
    """A model or tokenizer cannot be loaded from the given id or path."""


class DatasetError(AmctHfError, ValueError):
    """A dataset cannot be loaded or holds no usable text."""


class ExportError(AmctHfError, ValueError):
    """An export cannot be written (its target or its record is unusable)."""


class MissingFileError(AmctHfError, FileNotFoundError):
    """A file the user named (record, export, model folder, dataset) does not exist."""
class OutputPathError(AmctHfError, ValueError):
    """An output path exists and must not be replaced (not a regular file, read-only)."""


class RecordOverwriteWarning(UserWarning):
    """An entry already in the record is replaced with different values."""


class InvalidArgumentError(AmctHfError, ValueError):
    """An argument of a library function or a CLI flag is out of its allowed range."""


class DependencyVersionError(AmctHfError, ImportError):
    """An installed dependency (transformers) is outside the versions amct_hf is tested with."""
