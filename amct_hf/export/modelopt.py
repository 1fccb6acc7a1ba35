"""``modelopt-fp8``: a checkpoint directory in NVIDIA ModelOpt's unified Hugging Face layout
with static, calibrated per-tensor FP8 KV scales and the weights unquantized.

What is written follows what ModelOpt's ``export_hf_checkpoint``
(``modelopt/torch/export/unified_export_hf.py``, ``quant_utils.py``,
``convert_hf_config.py``) writes for a model whose only quantization is the FP8 KV cache:

* the model's weights, bit-identical (``model-0000k-of-0000n.safetensors`` + index), plus
  per attention module ``<attn>.k_proj.k_scale`` and ``<attn>.v_proj.v_scale``: ModelOpt
  renames the attention's ``k_bmm_quantizer._amax`` / ``v_bmm_quantizer._amax`` to these
  and divides the amax by the FP8 bound 448; a float32 scalar (shape ``[]``).
* ``hf_quant_config.json``: ``{"producer": {"name", "version"}, "quantization":
  {"quant_algo": null, "kv_cache_quant_algo": "FP8", "quantized_layers": {}}}``.
* ``config.json`` with ``quantization_config`` as ModelOpt's
  ``convert_hf_quant_config_format`` makes it from that: ``ignore`` [], ``kv_cache_scheme``
  {dynamic false, num_bits 8, type float}, ``producer``, ``quant_method`` ``"modelopt"``
  (no ``quant_algo`` and no ``config_groups``: the weights are not quantized).

The scale is the record's clip amax over 448 (:func:`amct_hf.export.vllm.fp8_kv_scale`).
One difference from ModelOpt, on purpose: ModelOpt clamps FP8 KV scales to at least 1.0;
the calibrated scale is written as it is (docs/serving.md has the measurements).

Who reads it (docs/serving.md): TensorRT-LLM and SGLang read ModelOpt checkpoints; vLLM's
ModelOpt config requires a ``quant_algo`` and refuses this KV-only layout, so for vLLM use
``vllm-fp8``.
"""
from __future__ import annotations

import os

from ..errors import ExportError
from .kv_pairs import kv_pairs, load_model_record, record_channel_factors
from .model_dir import DEFAULT_MAX_SHARD_SIZE, check_out_dir, write_model_dir
from .source_model import read_source_model
from .vllm import fp8_kv_scale

__all__ = ["MODELOPT_CONFIG_FILE", "modelopt_hf_quant_config", "modelopt_quantization_config",
           "export_modelopt_fp8"]

MODELOPT_CONFIG_FILE = "hf_quant_config.json"


def _producer() -> dict:
    from .. import __version__
    return {"name": "amct_hf", "version": __version__}


def modelopt_hf_quant_config() -> dict:
    """``hf_quant_config.json`` of a KV-cache-only FP8 checkpoint."""
    return {"producer": _producer(),
            "quantization": {"quant_algo": None, "kv_cache_quant_algo": "FP8", "quantized_layers": {}}}


def modelopt_quantization_config() -> dict:
    """config.json's ``quantization_config`` (ModelOpt's converted form of the above)."""
    return {"ignore": [], "kv_cache_scheme": {"dynamic": False, "num_bits": 8, "type": "float"},
            "producer": _producer(), "quant_method": "modelopt"}


def export_modelopt_fp8(record_file: str | os.PathLike, model_dir: str | os.PathLike,
                        out_dir: str | os.PathLike, *, overwrite: bool = False,
                        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                        trust_remote_code: bool = False) -> dict:
    """Write the ``modelopt-fp8`` directory for ``model_dir`` with the record's factors.

    Refused before anything is written as :func:`amct_hf.export.vllm.export_vllm_fp8`
    refuses. Returns ``{"out_dir", "files", "weight_map", "total_size", "kv_scales"}``.
    """
    import torch

    record_file = os.fspath(record_file)
    check_out_dir(out_dir, model_dir, overwrite)
    source = read_source_model(model_dir, trust_remote_code=trust_remote_code)
    existing = getattr(source.config, "quantization_config", None)
    if existing:
        raise ExportError(f"{source.model_dir}/config.json already has a quantization_config; "
                          f"export from the unquantized model")
    channel = record_channel_factors(load_model_record(record_file, source), source)
    added = {}
    for pair in kv_pairs(channel, source):
        added[f"{pair.attention}.k_proj.k_scale"] = torch.tensor(fp8_kv_scale(*pair.key), dtype=torch.float32)
        added[f"{pair.attention}.v_proj.v_scale"] = torch.tensor(fp8_kv_scale(*pair.value), dtype=torch.float32)

    def edit_config(config: dict) -> dict:
        return {**config, "quantization_config": modelopt_quantization_config()}

    result = write_model_dir(source, out_dir, added_tensors=added, weights_prefix="model",
                             max_shard_size=max_shard_size, overwrite=overwrite,
                             extra_json={MODELOPT_CONFIG_FILE: modelopt_hf_quant_config()},
                             edit_config=edit_config)
    result["kv_scales"] = {name: float(t) for name, t in added.items()}
    return result
