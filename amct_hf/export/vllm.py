"""``vllm-fp8``: a checkpoint directory vLLM loads with ``kv_cache_dtype="fp8"`` and static,
calibrated per-tensor FP8 KV scales.

No GPU engine takes static INT8 KV factors; vLLM takes static FP8 (E4M3) scales from a
compressed-tensors checkpoint. What is written follows what vLLM and compressed-tensors
read:

* the model's weights, bit-identical and shard-streamed (``model-0000k-of-0000n``), plus
  per attention module ``<attn>.k_scale`` and ``<attn>.v_scale``, float32 of shape ``[1]``.
  compressed-tensors' ``apply_quantization_config`` registers exactly these parameters
  (``k_scale`` / ``v_scale``) on every cached attention module for a ``kv_cache_scheme``;
  vLLM's model loaders remap ``.self_attn.k_scale`` onto their attention layer
  (``maybe_remap_kv_scale_name``).
* ``config.json`` with ``quantization_config``: ``quant_method: compressed-tensors``, no
  ``config_groups`` (weights stay as they are), ``kv_cache_scheme`` {num_bits 8, type
  float, strategy tensor, dynamic false, symmetric true}: the only scheme vLLM's
  ``CompressedTensorsKVCacheMethod.validate_kv_cache_scheme`` accepts.

The scale transfers the calibrated INT8 clip range to FP8: the record clips channel c to
``[s_c * (-128 - o_c), s_c * (127 - o_c)]``, so its largest magnitude is
``amax = max_c s_c * max(127 - o_c, o_c + 128)``, and FP8 E4M3's largest finite value
448 is mapped to it (``scale = amax / 448``, the convention vLLM's ``k_scale`` follows:
stored = x / k_scale). FP8 has no clipping grid of its own beyond that amax, so per-channel
records collapse to their widest channel.
"""
from __future__ import annotations

import os

from ..errors import ExportError
from .kv_pairs import kv_pairs, load_model_record, record_channel_factors
from .model_dir import DEFAULT_MAX_SHARD_SIZE, check_out_dir, write_model_dir
from .source_model import read_source_model

__all__ = ["FP8_E4M3_MAX", "VLLM_WEIGHTS_PREFIX", "KV_CACHE_SCHEME", "fp8_kv_scale",
           "vllm_quantization_config", "export_vllm_fp8"]

FP8_E4M3_MAX = 448.0
VLLM_WEIGHTS_PREFIX = "model"
KV_CACHE_SCHEME = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
                   "symmetric": True}


def fp8_kv_scale(scales: list[float], offsets: list[int]) -> float:
    """``max_c s_c * max(127 - o_c, o_c + 128) / 448``: the INT8 clip range's amax over 448."""
    amax = max(s * max(127 - o, o + 128) for s, o in zip(scales, offsets))
    return amax / FP8_E4M3_MAX


def vllm_quantization_config() -> dict:
    """The compressed-tensors ``quantization_config`` written into config.json."""
    return {"quant_method": "compressed-tensors", "format": "dense",
            "quantization_status": "frozen", "config_groups": {}, "ignore": [],
            "kv_cache_scheme": dict(KV_CACHE_SCHEME)}


def export_vllm_fp8(record_file: str | os.PathLike, model_dir: str | os.PathLike,
                    out_dir: str | os.PathLike, *, overwrite: bool = False,
                    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                    trust_remote_code: bool = False) -> dict:
    """Write the ``vllm-fp8`` checkpoint directory for ``model_dir`` with the record's factors.

    Refused before anything is written: a record that does not match the model (first
    mismatching layer named), a model whose config.json already has a
    ``quantization_config``, an existing non-empty ``out_dir`` unless ``overwrite``.
    Returns ``{"out_dir", "files", "weight_map", "total_size", "kv_scales"}`` with
    ``kv_scales`` = tensor name -> scale.
    """
    import torch

    record_file = os.fspath(record_file)
    check_out_dir(out_dir, model_dir, overwrite)
    source = read_source_model(model_dir, trust_remote_code=trust_remote_code)
    existing = getattr(source.config, "quantization_config", None)
    if existing:
        method = existing.get("quant_method") if isinstance(existing, dict) else type(existing).__name__
        raise ExportError(f"{source.model_dir}/config.json already has a quantization_config "
                          f"({method}); export from the unquantized model")
    factors = load_model_record(record_file, source)
    channel = record_channel_factors(factors, source)
    scales = {}
    for pair in kv_pairs(channel, source):
        scales[f"{pair.attention}.k_scale"] = fp8_kv_scale(*pair.key)
        scales[f"{pair.attention}.v_scale"] = fp8_kv_scale(*pair.value)
    added = {name: torch.tensor([s], dtype=torch.float32) for name, s in scales.items()}

    def edit_config(config: dict) -> dict:
        return {**config, "quantization_config": vllm_quantization_config()}

    result = write_model_dir(source, out_dir, added_tensors=added,
                             weights_prefix=VLLM_WEIGHTS_PREFIX, max_shard_size=max_shard_size,
                             overwrite=overwrite, edit_config=edit_config)
    result["kv_scales"] = {name: float(t) for name, t in added.items()}
    return result
