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


def __getattr__(name):
    # the transformers side is imported lazily: the operator alone must not pay for it
    if name in ("calibrate_kv_cache", "CalibrationResult"):
        from . import calibrate
        return getattr(calibrate, name)
    if name in ("kv_calibration", "KVCalibrationHooks"):
        from . import hooks
        return getattr(hooks, name)
    raise AttributeError(f"module 'amct_hf' has no attribute {name!r}")
