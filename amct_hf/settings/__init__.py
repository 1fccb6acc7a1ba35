"""What one calibration runs with, validated once: ``quant_algo_params`` (the operator's
contract), the engine presets (``target=``) and the per-kind settings they resolve to."""
from .presets import TARGETS, KVSettings, resolve_kv_settings
from .quant_params import QuantParams, parse_quant_algo_params

__all__ = ["TARGETS", "KVSettings", "QuantParams", "parse_quant_algo_params", "resolve_kv_settings"]
