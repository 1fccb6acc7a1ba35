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
    "QuantParams": "settings.quant_params", "parse_quant_algo_params": "settings.quant_params",
    "read_kv_factors": "record.files", "write_kv_factors": "record.files", "load_kv_factors": "record.files",
    "calibrate_kv_cache": "calibrate", "CalibrationResult": "calibrate",
    "kv_calibration": "modeling.attention", "kv_transform": "modeling.attention",
    "KVCalibrationHooks": "modeling.attention",
    "StaticInt8KVCache": "modeling.cache",
    "evaluate_kv_quant": "evaluation.perplexity", "EvalResult": "evaluation.perplexity",
    "export_json": "export.factors", "export_safetensors": "export.factors", "load_export": "export.factors",
    "export_ascend_c8": "export.ascend", "export_vllm_fp8": "export.vllm",
    "export_lmdeploy_ascend": "export.lmdeploy",
    "plot_report": "evaluation.report",
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
