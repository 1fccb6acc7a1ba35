"""amct_hf: INT8 KV-cache calibration (IFMR / HFMG) for Hugging Face transformers,
writing Ascend AMCT record files."""
from .errors import (AmctHfError, AssetNotFoundError, CalibrationInputError, DatasetError,
                     ExportError, ModelLoadError, QuantParamsError, RecordFileError,
                     RecordMismatchError, RecordOverwriteWarning, UnpatchableModelError)
from .op import QuantCalibrationOp
from .params import QuantParams, parse_quant_algo_params
from .record import read_kv_factors, write_kv_factors

__all__ = [
    "QuantCalibrationOp", "QuantParams", "parse_quant_algo_params", "read_kv_factors",
    "write_kv_factors", "AmctHfError", "AssetNotFoundError", "CalibrationInputError",
    "DatasetError", "ExportError", "ModelLoadError", "QuantParamsError", "RecordFileError",
    "RecordMismatchError", "RecordOverwriteWarning", "UnpatchableModelError",
]
__version__ = "0.1.0"


_LAZY = {
    # the transformers side is imported on first use: the operator alone must not pay for it
    "calibrate_kv_cache": "calibrate", "CalibrationResult": "calibrate",
    "kv_calibration": "hooks", "kv_transform": "hooks", "KVCalibrationHooks": "hooks",
    "evaluate_kv_quant": "evaluate", "EvalResult": "evaluate",
    "StaticInt8KVCache": "cache",
    "export_json": "export", "export_safetensors": "export", "load_export": "export",
    "plot_report": "report",
}
__all__ += list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'amct_hf' has no attribute {name!r}")
