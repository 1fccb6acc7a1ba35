"""``ascend-c8``: a model directory that Ascend engines load with an INT8 (C8) KV cache.

What is written follows what msModelSlim (v1 flow, KV-cache-only C8) produces and what
its consumers read:

* every tensor of the model, bit-identical, plus per attention module
  ``<attn>.k_proj.kv_cache_scale`` / ``.kv_cache_offset`` and the same for ``v_proj``,
  each of shape ``[num_key_value_heads * head_dim]`` in the model's dtype.
  vllm-ascend's C8 KV method (``AscendC8KVCacheAttentionMethod`` in
  ``vllm_ascend/quantization/methods/kv_c8.py``, enabled by ``kv_cache_type == "C8"`` in
  the description) creates the KV scale parameters of exactly that length, casts them to
  the default dtype on load, views them as ``(num_kv_heads, 1, head_size)``, and
  dequantizes with the scale alone in paged decode, chunked prefill and graph mode: a
  one-element scale breaks those views, and a non-zero offset would be ignored there.
  MindIE bit-casts the float offsets to int32, so only zeros read back as zeros.
  So the exported offsets are zeros: keys must be symmetric; value
  offsets of a Llama-family model are folded into its attention biases
  (:mod:`amct_hf.export.folding`: ``v_proj.bias`` and ``o_proj.bias`` changed or created,
  ``config.json`` ``attention_bias: true``), which serves the asymmetric value record
  exactly; other models must have symmetric values too.
* ``quant_model_weights-0000k-of-0000n.safetensors`` + ``quant_model_weights.safetensors.index.json``.
* ``quant_model_description.json``: every tensor name -> ``"FLOAT"``, the KV tensors ->
  ``"C8"``, then ``kv_cache_type`` / ``kv_quant_type`` ``"C8"``, ``version`` ``"1.0.0"``,
  ``model_quant_type`` ``"FLOAT"``, ``metadata`` {}, ``group_size`` 0, ``optional`` {}.
  vllm-ascend's ``AscendQuantConfig`` reads this file (``get_config_filenames``), gives
  an attention layer the KV-cache method when ``kv_quant_type == "C8"``, and looks up
  ``<prefix>.weight`` of every linear layer (a ``KeyError`` when one is missing, the
  reason every tensor must be described).
* the other files of the model directory (config.json, generation_config.json,
  tokenizer files, chat template) copied verbatim.

KV convention (as msModelSlim's: hooked at the cache update): post-RoPE, channel =
``head * head_dim + d``, i.e. amct_hf's ``tap="cache"`` per-channel order.
"""
from __future__ import annotations

import os

from ..errors import ExportError
from .folding import fold_value_offsets
from .kv_pairs import kv_pairs, load_model_record, record_channel_factors
from .model_dir import DEFAULT_MAX_SHARD_SIZE, check_out_dir, write_model_dir
from .source_model import read_source_model

__all__ = ["ASCEND_WEIGHTS_PREFIX", "ASCEND_DESCRIPTION_FILE", "export_ascend_c8"]

ASCEND_WEIGHTS_PREFIX = "quant_model_weights"
ASCEND_DESCRIPTION_FILE = "quant_model_description.json"
_SCALE, _OFFSET = "kv_cache_scale", "kv_cache_offset"


def _refuse_key_offsets(pairs, record_file: str) -> None:
    for pair in pairs:
        bad = next((o for o in pair.key[1] if o != 0), None)
        if bad is not None:
            raise ExportError(
                f"record {record_file}: layer {pair.key_record_name!r} has offset {bad} (asymmetric "
                f"keys); vllm-ascend and MindIE dequantize the KV cache with the scale alone, and "
                f"keys are rotated after k_proj, so no bias can carry their offset: recalibrate "
                f"with symmetric keys (--target ascend-c8, or --symmetric)")


def export_ascend_c8(record_file: str | os.PathLike, model_dir: str | os.PathLike,
                     out_dir: str | os.PathLike, *, overwrite: bool = False,
                     max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                     trust_remote_code: bool = False) -> dict:
    """Write the ``ascend-c8`` directory for ``model_dir`` with the record's KV factors.

    Refused before anything is written (``ExportError`` / ``RecordMismatchError``, one
    line): a record with a non-zero key offset, or with non-zero value offsets for a model
    that cannot fold them into its attention biases, a record that does not match the model
    (first mismatching layer named), an existing non-empty ``out_dir`` unless
    ``overwrite``. Returns ``{"out_dir", "files", "weight_map", "total_size",
    "kv_tensors", "folded_value_offsets"}``.
    """
    import torch

    record_file = os.fspath(record_file)
    check_out_dir(out_dir, model_dir, overwrite)  # fail fast; checked again before writing
    source = read_source_model(model_dir, trust_remote_code=trust_remote_code)
    factors = load_model_record(record_file, source)
    pairs = kv_pairs(record_channel_factors(factors, source), source)
    _refuse_key_offsets(pairs, record_file)
    folded = fold_value_offsets(pairs, source, record_file)
    added = dict(folded.added) if folded else {}
    for pair in pairs:
        for proj, (scales, _) in (("k_proj", pair.key), ("v_proj", pair.value)):
            prefix = f"{pair.attention}.{proj}."
            # The record holds float32 values; the engines want the model's dtype.
            added[prefix + _SCALE] = torch.tensor(scales, dtype=torch.float32).to(source.dtype)
            added[prefix + _OFFSET] = torch.zeros(len(scales), dtype=source.dtype)

    description = {t.name: "FLOAT" for t in source.tensors}
    description.update({name: "FLOAT" if name.endswith(".bias") else "C8" for name in added})
    description.update({"kv_cache_type": "C8", "kv_quant_type": "C8", "version": "1.0.0",
                        "model_quant_type": "FLOAT", "metadata": {}, "group_size": 0,
                        "optional": {}})
    result = write_model_dir(source, out_dir, added_tensors=added,
                             weights_prefix=ASCEND_WEIGHTS_PREFIX, max_shard_size=max_shard_size,
                             overwrite=overwrite,
                             extra_json={ASCEND_DESCRIPTION_FILE: description},
                             replaced_tensors=folded.replaced if folded else None,
                             edit_config=folded.edit_config if folded else None)
    result["kv_tensors"] = sorted(n for n in added if not n.endswith(".bias"))
    result["folded_value_offsets"] = folded is not None
    return result
