"""amct_hf: INT8 KV-cache calibration (IFMR / HFMG) for Hugging Face transformers,
writing Ascend AMCT record files."""
from .op import CalibrationInputError, QuantCalibrationOp
from .params import QuantParams, QuantParamsError, parse_quant_algo_params
from .record import RecordFileError, RecordOverwriteWarning, read_kv_factors, write_kv_factors

__all__ = [
    "QuantCalibrationOp", "CalibrationInputError", "QuantParams", "QuantParamsError",
    "parse_quant_algo_params", "RecordFileError", "RecordOverwriteWarning", "read_kv_factors",
    "write_kv_factors",
]
__version__ = "0.1.0"


_LAZY = {
    # the transformers side is imported on first use: the operator alone must not pay for it
    "calibrate_kv_cache": "calibrate", "CalibrationResult": "calibrate",
    "kv_calibration": "hooks", "kv_transform": "hooks", "KVCalibrationHooks": "hooks",
    "UnpatchableModelError": "hooks",
    "evaluate_kv_quant": "evaluate", "EvalResult": "evaluate", "RecordMismatchError": "evaluate",
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
