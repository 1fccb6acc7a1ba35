"""``vllm-fp8``: a checkpoint directory vLLM loads with ``kv_cache_dtype="fp8"`` and static,
calibrated FP8 KV scales (one per tensor, or one per KV head).

No GPU engine takes static INT8 KV factors; vLLM takes static FP8 (E4M3) scales from a
compressed-tensors checkpoint. What is written follows what vLLM and compressed-tensors
read:

* the model's weights, bit-identical and shard-streamed (``model-0000k-of-0000n``), plus
  per attention module ``<attn>.k_scale`` and ``<attn>.v_scale``, float32 of shape ``[1]``
  (``kv_strategy="tensor"``) or ``[num_key_value_heads]`` (``kv_strategy="attn_head"``).
  compressed-tensors' ``apply_quantization_config`` registers exactly these parameters
  (``k_scale`` / ``v_scale``) on every cached attention module for a ``kv_cache_scheme``;
  vLLM's model loaders remap ``.self_attn.k_scale`` onto their attention layer
  (``maybe_remap_kv_scale_name``).
* ``config.json`` with ``quantization_config``: ``quant_method: compressed-tensors``, no
  ``config_groups`` (weights stay as they are), ``kv_cache_scheme`` {num_bits 8, type
  float, strategy tensor or attn_head, dynamic false, symmetric true}. vLLM's
  compressed-tensors KV validation accepts ``tensor`` and, in current releases,
  ``attn_head`` (per-head scales are used by the FlashAttention 3 backend only;
  docs/serving.md). ``<attn>.q_scale`` is written only with ``query_scales``
  (:mod:`amct_hf.export.query`); without it vLLM quantizes the query to FP8 with 1.0 on
  the backends that quantize it.

The scale transfers the calibrated INT8 clip range to FP8: the record clips channel c to
``[s_c * (-128 - o_c), s_c * (127 - o_c)]``, so its largest magnitude is
``amax = max_c s_c * max(127 - o_c, o_c + 128)``, and FP8 E4M3's largest finite value
448 is mapped to it (``scale = amax / 448``, the convention vLLM's ``k_scale`` follows:
stored = x / k_scale). FP8 has no clipping grid of its own beyond that amax, so per-channel
records collapse to their widest channel (per tensor) or to each head's widest channel
(``attn_head``).

vLLM saturates ``x / scale`` to +-448 when it writes the cache; ROCm MI300 (e4m3fnuz, max
240) is not a target of this export: the scales are for e4m3fn.
"""
from __future__ import annotations

import os

from ..errors import ExportError
from .kv_pairs import kv_pairs, load_model_record, record_channel_factors
from .model_dir import DEFAULT_MAX_SHARD_SIZE, check_out_dir, write_model_dir
from .source_model import read_source_model

__all__ = ["FP8_E4M3_MAX", "VLLM_WEIGHTS_PREFIX", "KV_CACHE_SCHEME", "KV_STRATEGIES", "fp8_kv_scale",
           "fp8_head_scales", "vllm_quantization_config", "export_vllm_fp8"]

FP8_E4M3_MAX = 448.0
VLLM_WEIGHTS_PREFIX = "model"
KV_CACHE_SCHEME = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
                   "symmetric": True}
KV_STRATEGIES = ("tensor", "attn_head")


def fp8_kv_scale(scales: list[float], offsets: list[int]) -> float:
    """``max_c s_c * max(127 - o_c, o_c + 128) / 448``: the INT8 clip range's amax over 448."""
    amax = max(s * max(127 - o, o + 128) for s, o in zip(scales, offsets))
    return amax / FP8_E4M3_MAX


def fp8_head_scales(scales: list[float], offsets: list[int], heads: int) -> list[float]:
    """One :func:`fp8_kv_scale` per KV head over that head's channels (channel =
    ``head * head_dim + d``)."""
    if len(scales) % heads:
        raise ExportError(f"{len(scales)} channels do not split into {heads} KV heads")
    dim = len(scales) // heads
    return [fp8_kv_scale(scales[h * dim:(h + 1) * dim], offsets[h * dim:(h + 1) * dim]) for h in range(heads)]


def vllm_quantization_config(kv_strategy: str = "tensor") -> dict:
    """The compressed-tensors ``quantization_config`` written into config.json."""
    return {"quant_method": "compressed-tensors", "format": "dense",
            "quantization_status": "frozen", "config_groups": {}, "ignore": [],
            "kv_cache_scheme": {**KV_CACHE_SCHEME, "strategy": kv_strategy}}


def export_vllm_fp8(record_file: str | os.PathLike, model_dir: str | os.PathLike,
                    out_dir: str | os.PathLike, *, overwrite: bool = False,
                    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                    trust_remote_code: bool = False, kv_strategy: str = "tensor",
                    query_scales: dict | None = None) -> dict:
    """Write the ``vllm-fp8`` checkpoint directory for ``model_dir`` with the record's factors.

    ``kv_strategy``: ``"tensor"`` (one scale per K/V tensor, every vLLM FP8 backend) or
    ``"attn_head"`` (one per KV head, read by vLLM's FlashAttention 3 backend).
    ``query_scales``: ``{attention path: [q_scale, ...]}``
    (:func:`amct_hf.export.query.calibrate_query_scales`), written as ``<attn>.q_scale``;
    without them vLLM quantizes the query with 1.0.

    Refused before anything is written: a record that does not match the model (first
    mismatching layer named), a model whose config.json already has a
    ``quantization_config``, an existing non-empty ``out_dir`` unless ``overwrite``.
    Returns ``{"out_dir", "files", "weight_map", "total_size", "kv_scales"}`` with
    ``kv_scales`` = tensor name -> scale.
    """
    import torch

    if kv_strategy not in KV_STRATEGIES:
        raise ExportError(f"kv_strategy={kv_strategy!r}; use one of {KV_STRATEGIES}")
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
    text = source.config.get_text_config() if hasattr(source.config, "get_text_config") else source.config
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    scales = {}
    for pair in kv_pairs(channel, source):
        for name, factors in ((f"{pair.attention}.k_scale", pair.key), (f"{pair.attention}.v_scale", pair.value)):
            scales[name] = [fp8_kv_scale(*factors)] if kv_strategy == "tensor" \
                else fp8_head_scales(*factors, heads)
    if query_scales is not None:
        width = 1 if kv_strategy == "tensor" else heads
        for pair in kv_pairs(channel, source):
            q = query_scales.get(pair.attention)
            if q is None or len(q) not in (1, width):
                raise ExportError(f"query_scales has {'no' if q is None else len(q)} scale(s) for "
                                  f"{pair.attention!r}; expected {width}")
            scales[f"{pair.attention}.q_scale"] = [max(q)] if width == 1 else list(q) * (width // len(q))
    added = {name: torch.tensor(s, dtype=torch.float32) for name, s in scales.items()}

    def edit_config(config: dict) -> dict:
        return {**config, "quantization_config": vllm_quantization_config(kv_strategy)}

    result = write_model_dir(source, out_dir, added_tensors=added,
                             weights_prefix=VLLM_WEIGHTS_PREFIX, max_shard_size=max_shard_size,
                             overwrite=overwrite, edit_config=edit_config)
    result["kv_scales"] = {name: t.tolist() if t.numel() > 1 else float(t) for name, t in added.items()}
    return result
