"""Deployable exports: what serving engines load, built from a model directory and a record.

* ``ascend-c8``: :func:`export_ascend_c8` (vllm-ascend, MindIE: INT8 KV cache).
* ``vllm-fp8``: :func:`export_vllm_fp8` (vLLM, compressed-tensors FP8 KV scales).
* ``lmdeploy-ascend``: :func:`export_lmdeploy_ascend` (lmdeploy's Ascend backend record).

torch and transformers are imported inside the functions, so importing this is light.
"""
from __future__ import annotations

from .ascend import export_ascend_c8
from .lmdeploy import export_lmdeploy_ascend
from .vllm import export_vllm_fp8

__all__ = ["export_ascend_c8", "export_vllm_fp8", "export_lmdeploy_ascend", "DEPLOY_FORMATS"]

DEPLOY_FORMATS = ("ascend-c8", "vllm-fp8", "lmdeploy-ascend")
