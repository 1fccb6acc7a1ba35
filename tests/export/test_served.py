"""Exports read and computed the way their engines do. The engines' arithmetic is
re-implemented here from reading their code (vLLM's FP8 cache write, vllm-ascend's
scale-only C8), not taken from amct_hf, and the evaluation's simulation
(:mod:`amct_hf.evaluation.served`) is checked against it."""
import json

import numpy as np
import pytest
import torch

from amct_hf.evaluation.served import load_export_model, read_served_export
from amct_hf.export import export_ascend_c8, export_vllm_fp8
from amct_hf.export.modelopt import export_modelopt_fp8
from amct_hf.record.files import read_kv_factors

from .dirs import load_dir_tensors

KV_HEADS, HEAD_DIM = 3, 64


def vllm_fp8_cache_roundtrip(x, scale):
    """vLLM's reshape_and_cache with kv_cache_dtype fp8 (CUDA): the float value divided by
    the scale, converted to e4m3 with saturation to the finite range (SATFINITE), and
    read back times the scale. ``scale``: one value, or one per KV head (x is [.., H, S, D])."""
    s = torch.as_tensor(scale, dtype=torch.float32)
    if s.numel() > 1:
        s = s.reshape(-1, 1, 1)
    y = (x.float() / s).clamp(-448.0, 448.0)
    return y.to(torch.float8_e4m3fn).to(torch.float32) * s


def ascend_c8_roundtrip(x, scale, model_dtype):
    """vllm-ascend C8: the scale parameter cast to the model's dtype, keys/values viewed as
    [tokens, kv_heads * head_dim], quantized round(x / s) to int8 (scale only), and
    dequantized q * s."""
    s = scale.to(model_dtype).float().reshape(1, KV_HEADS, 1, HEAD_DIM)
    q = torch.round(x.float() / s).clamp(-128, 127).to(torch.int8)
    return q.float() * s


def _clip_amax(scales, offsets):
    s, o = np.asarray(scales, np.float64), np.asarray(offsets, np.float64)
    return np.maximum(s * (127 - o), s * (o + 128))


@pytest.fixture(scope="module")
def vllm_head(sym_record, smollm2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("served") / "vllm-head"
    export_vllm_fp8(sym_record, smollm2_dir, out, kv_strategy="attn_head")
    return out


def test_attn_head_scales_are_each_heads_clip_amax_over_448(vllm_head, sym_record):
    config = json.loads((vllm_head / "config.json").read_text())
    assert config["quantization_config"]["kv_cache_scheme"]["strategy"] == "attn_head"
    tensors, _ = load_dir_tensors(vllm_head)
    record = read_kv_factors(sym_record)
    for i in (0, 17, 29):
        for kind, proj in (("k", "k_proj"), ("v", "v_proj")):
            t = tensors[f"model.layers.{i}.self_attn.{kind}_scale"]
            assert t.dtype == torch.float32 and list(t.shape) == [KV_HEADS]
            amax = _clip_amax(*record[f"model.layers.{i}.self_attn.{proj}"]).reshape(KV_HEADS, HEAD_DIM)
            np.testing.assert_allclose(t.numpy(), (amax.max(1) / 448.0).astype(np.float32), rtol=1e-6)


@pytest.mark.parametrize("strategy", ["tensor", "attn_head"])
def test_vllm_e4m3_roundtrip_of_our_scales(strategy, vllm_head, sym_record, smollm2_dir, tmp_path):
    """Values inside the calibrated range come back through vLLM's FP8 write/read with
    E4M3's relative precision (3 mantissa bits) and are never saturated; the clip amax
    itself lands on 448; the evaluation's simulation computes exactly what vLLM does."""
    if strategy == "tensor":
        out = tmp_path / "vllm"
        export_vllm_fp8(sym_record, smollm2_dir, out)
    else:
        out = vllm_head
    tensors, _ = load_dir_tensors(out)
    served = read_served_export(out, torch.float32)
    run = served.function()
    record = read_kv_factors(sym_record)
    g = torch.Generator().manual_seed(1)
    for i in (0, 29):
        name = f"model.layers.{i}.self_attn.k_proj"
        scale = tensors[f"model.layers.{i}.self_attn.k_scale"]
        amax = torch.tensor(_clip_amax(*record[name]), dtype=torch.float32).reshape(KV_HEADS, 1, HEAD_DIM)
        x = (torch.rand(1, KV_HEADS, 16, HEAD_DIM, generator=g) * 2 - 1) * amax
        theirs = vllm_fp8_cache_roundtrip(x, scale)
        normal = x.abs() > 2 ** -6 * scale.max()
        rel = ((theirs - x).abs() / x.abs())[normal]
        assert float(rel.max()) <= 2 ** -4 + 1e-6
        ours, saturated = run(name, x)
        assert torch.equal(ours, theirs) and not saturated.any()
        top = (scale.reshape(-1, 1, 1) if scale.numel() > 1 else scale) * 448.0
        assert torch.equal(vllm_fp8_cache_roundtrip(top.expand(1, KV_HEADS, 1, 1), scale).flatten(),
                           top.expand(1, KV_HEADS, 1, 1).flatten())


def test_ascend_c8_scale_only_int8_with_model_dtype_scales(centred_record, smollm2_dir, tmp_path):
    """The evaluation's ascend-c8 simulation equals vllm-ascend's scale-only INT8 with the
    scale cast to the model dtype (bf16 rounding included), and the exported weights are
    the folded ones."""
    out = tmp_path / "ascend"
    export_ascend_c8(centred_record, smollm2_dir, out)
    tensors, _ = load_dir_tensors(out)
    g = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16):
        served = read_served_export(out, dtype)
        run = served.function()
        for i in (0, 11):
            name = f"model.layers.{i}.self_attn.v_proj"
            scale = tensors[f"model.layers.{i}.self_attn.v_proj.kv_cache_scale"]
            x = torch.randn(1, KV_HEADS, 8, HEAD_DIM, generator=g) * 40 \
                * scale.float().reshape(1, KV_HEADS, 1, HEAD_DIM)
            ours, _ = run(name, x)
            assert torch.equal(ours, ascend_c8_roundtrip(x, scale, dtype))
    bf16 = read_served_export(out, torch.bfloat16).scales[("model.layers.0.self_attn", "key")]
    fp32 = read_served_export(out, torch.float32).scales[("model.layers.0.self_attn", "key")]
    assert not torch.equal(bf16, fp32)  # the cast is part of what is served
    model, _ = load_export_model(out)
    v_bias = tensors["model.layers.0.self_attn.v_proj.bias"]
    assert torch.equal(model.model.layers[0].self_attn.v_proj.bias.detach(), v_bias)
    assert any(v_bias != 0)


def test_modelopt_fields_match_modelopts_kv_only_export(sym_record, smollm2_dir, tmp_path):
    """Field by field what ModelOpt's export_hf_checkpoint writes for FP8 KV only
    (unified_export_hf.py, quant_utils.get_quant_config / postprocess_state_dict,
    convert_hf_config.convert_hf_quant_config_format), read from their code:

    * hf_quant_config.json: {"producer": {name, version}, "quantization": {"quant_algo": None,
      "kv_cache_quant_algo": "FP8", "quantized_layers": {}}} (no quantized linear layer);
    * config.json quantization_config: ignore [], kv_cache_scheme {dynamic False, num_bits 8,
      type float}, producer, quant_method "modelopt" (no quant_algo, no config_groups);
    * <attn>.k_bmm_quantizer._amax -> <attn>.k_proj.k_scale = amax / 448 (float32, the
      amax's 0-d shape), same for v.
    """
    out = tmp_path / "modelopt"
    export_modelopt_fp8(sym_record, smollm2_dir, out)
    hf_quant = json.loads((out / "hf_quant_config.json").read_text())
    assert set(hf_quant) == {"producer", "quantization"}
    assert set(hf_quant["producer"]) == {"name", "version"}
    assert hf_quant["quantization"] == {"quant_algo": None, "kv_cache_quant_algo": "FP8", "quantized_layers": {}}
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == {"ignore": [], "kv_cache_scheme": {"dynamic": False, "num_bits": 8, "type": "float"},
                  "producer": hf_quant["producer"], "quant_method": "modelopt"}
    # TensorRT-LLM (tensorrt_llm/quantization/modelopt_config.py) reads the file's nested
    # "quantization" form and the inline flat form (kv_cache_scheme float/8 bits -> "FP8")
    # and warns when quant_algo / kv_cache_quant_algo / group_size / excludes differ
    legacy = hf_quant["quantization"]
    scheme = qc["kv_cache_scheme"]
    flat_kv = "FP8" if scheme.get("type") == "float" and scheme.get("num_bits") == 8 else None
    assert (legacy.get("quant_algo"), legacy.get("kv_cache_quant_algo"), legacy.get("group_size")) \
        == (qc.get("quant_algo"), flat_kv, qc.get("group_size")) == (None, "FP8", None)
    assert set(legacy.get("exclude_modules") or []) == set(qc.get("ignore") or [])
    tensors, weight_map = load_dir_tensors(out)
    assert (out / "model.safetensors.index.json").is_file()
    record = read_kv_factors(sym_record)
    kv_names = {n for n in tensors if n.endswith("_scale")}
    assert len(kv_names) == 60
    for i in range(30):
        for proj, suffix in (("k_proj", "k_scale"), ("v_proj", "v_scale")):
            t = tensors[f"model.layers.{i}.self_attn.{proj}.{suffix}"]
            assert t.dtype == torch.float32 and t.shape == torch.Size([])
            amax = _clip_amax(*record[f"model.layers.{i}.self_attn.{proj}"]).max()
            assert float(t) == pytest.approx(amax / 448.0, rel=1e-6)
    source = load_dir_tensors(out)[0]["model.layers.3.mlp.up_proj.weight"]
    from safetensors.torch import load_file
    assert torch.equal(source, load_file(str(smollm2_dir / "model.safetensors"))["model.layers.3.mlp.up_proj.weight"])
