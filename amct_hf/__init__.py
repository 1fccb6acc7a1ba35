"""amct_hf: INT8 KV-cache calibration (IFMR / HFMG) for Hugging Face transformers,
writing Ascend AMCT record files.

Every name is imported on first use (PEP 562): ``import amct_hf`` costs nothing, the
operator does not import transformers, and the command line starts at once.
"""
from .errors import (
    AmctHfError,
    AssetNotFoundError,
    CalibrationInputError,
    DatasetError,
    ExportError,
    InvalidArgumentError,
    MissingFileError,
    ModelLoadError,
    QuantParamsError,
    RecordFileError,
    RecordMismatchError,
    RecordOverwriteWarning,
    UnpatchableModelError,
)

__version__ = "0.1.0"

_LAZY = {
    "QuantCalibrationOp": "op",
    "QuantParams": "params", "parse_quant_algo_params": "params",
    "read_kv_factors": "record", "write_kv_factors": "record", "load_kv_factors": "record",
    "calibrate_kv_cache": "calibrate", "CalibrationResult": "calibrate",
    "kv_calibration": "modeling.attention", "kv_transform": "modeling.attention",
    "KVCalibrationHooks": "modeling.attention",
    "StaticInt8KVCache": "modeling.cache",
    "evaluate_kv_quant": "evaluate", "EvalResult": "evaluate",
    "export_json": "export", "export_safetensors": "export", "load_export": "export",
    "plot_report": "report",
}

__all__ = [
    "AmctHfError", "AssetNotFoundError", "CalibrationInputError", "DatasetError", "ExportError",
    "InvalidArgumentError", "MissingFileError", "ModelLoadError", "QuantParamsError",
    "RecordFileError", "RecordMismatchError", "RecordOverwriteWarning", "UnpatchableModelError",
    *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'amct_hf' has no attribute {name!r}")
