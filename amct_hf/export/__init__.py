"""Everything a record is exported to, in one table (:data:`FORMATS`): factor files
(json, safetensors) and what serving engines load (ascend-c8, vllm-fp8, modelopt-fp8,
lmdeploy-ascend); :mod:`.verify` checks an export as its engine reads it.

torch and transformers are imported inside the export functions, so importing this is
light.
"""
from .ascend import export_ascend_c8
from .factors import export_json, export_safetensors, load_export
from .formats import FORMATS, ExportFormat, export_format
from .lmdeploy import export_lmdeploy_ascend
from .modelopt import export_modelopt_fp8
from .verify import verify_export
from .vllm import export_vllm_fp8

__all__ = ["FORMATS", "ExportFormat", "export_format", "export_ascend_c8", "export_json",
           "export_lmdeploy_ascend", "export_modelopt_fp8", "export_safetensors", "export_vllm_fp8",
           "load_export", "verify_export"]
