"""vllm-fp8 on the real SmolLM2, checked with the compressed-tensors package itself."""
import inspect
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from amct_hf.errors import ExportError, RecordMismatchError
from amct_hf.export import export_vllm_fp8
from amct_hf.record.files import read_kv_factors, write_kv_factors

from .dirs import load_dir_tensors

ct_lifecycle = pytest.importorskip("compressed_tensors.quantization.lifecycle")
from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config  # noqa: E402
from compressed_tensors.quantization.lifecycle import apply as ct_apply  # noqa: E402
from compressed_tensors.quantization.lifecycle import initialize as ct_initialize  # noqa: E402

LAYERS = 30


@pytest.fixture(scope="module")
def exported(sym_record, smollm2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm") / "smollm2-fp8"
    return out, export_vllm_fp8(sym_record, smollm2_dir, out, max_shard_size="300MB")


def _amax_over_448(scales, offsets):
    # Written independently of the library: the INT8 grid [-128, 127] shifted by the
    # offset, times the scale, is the clip range; its largest magnitude maps to FP8's 448.
    s, o = np.asarray(scales, np.float64), np.asarray(offsets, np.float64)
    return float(np.max(np.maximum(s * (127 - o), s * (o + 128))) / 448.0)


@pytest.fixture
def transformers5_attention(monkeypatch):
    """compressed-tensors 0.20.1 recognises a cached attention module by a forward
    parameter named ``past_key_value(s)``; transformers 5 renamed it ``cache``. Teach
    only that detection the new name; the registration of k_scale/v_scale is theirs."""
    original = ct_initialize.is_cached_attention_module

    def is_cached_attention_module(module):
        if original(module):
            return True
        return (ct_initialize._is_attention_module(module)
                and "cache" in inspect.signature(module.forward).parameters)

    for mod in (ct_apply, ct_initialize):
        monkeypatch.setattr(mod, "is_cached_attention_module", is_cached_attention_module)


def test_config_parses_and_state_dict_loads(exported, smollm2_dir, transformers5_attention):
    from transformers import AutoModelForCausalLM

    out, _ = exported
    config = json.loads((out / "config.json").read_text())
    source_config = json.loads((smollm2_dir / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "quantization_config"} == source_config
    qc = QuantizationConfig.model_validate(config["quantization_config"])
    assert qc.quant_method == "compressed-tensors" and qc.config_groups == {}
    kv = qc.kv_cache_scheme
    assert (kv.num_bits, kv.type, kv.strategy, kv.dynamic, kv.symmetric) == (8, "float", "tensor", False, True)

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, local_files_only=True)
    apply_quantization_config(model, qc)
    assert model.model.layers[0].self_attn.k_scale.shape == (1,)
    state, _ = load_dir_tensors(out)
    result = model.load_state_dict(state, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert model.model.layers[5].self_attn.v_scale.item() == state["model.layers.5.self_attn.v_scale"].item()


def test_scales_are_clip_amax_over_448_and_weights_identical(exported, smollm2_dir, sym_record):
    out, result = exported
    assert len([n for n in os.listdir(out) if n.endswith(".safetensors")]) >= 2  # 300 MB cap
    tensors, _ = load_dir_tensors(out)
    record = read_kv_factors(sym_record)
    for i in range(LAYERS):
        for proj, kv in (("k_proj", "k_scale"), ("v_proj", "v_scale")):
            t = tensors[f"model.layers.{i}.self_attn.{kv}"]
            assert t.dtype == torch.float32 and t.shape == (1,)
            expected = np.float32(_amax_over_448(*record[f"model.layers.{i}.self_attn.{proj}"]))
            assert t.item() == expected
    source = load_file(smollm2_dir / "model.safetensors")
    for name, t in source.items():
        assert torch.equal(tensors[name].view(torch.uint8), t.view(torch.uint8)), name
    assert set(tensors) - set(source) == {"lm_head.weight"} | {
        f"model.layers.{i}.self_attn.{kv}" for i in range(LAYERS) for kv in ("k_scale", "v_scale")}


def test_asymmetric_record_uses_the_shifted_clip_range(sym_record, smollm2_dir, tmp_path):
    factors = read_kv_factors(sym_record)
    name = "model.layers.0.self_attn.k_proj"
    scales, _ = factors[name]
    offsets = [(-1) ** c * (c % 50) for c in range(len(scales))]  # both signs, up to 49
    factors[name] = (scales, offsets)
    write_kv_factors(tmp_path / "asym.txt", factors)
    result = export_vllm_fp8(tmp_path / "asym.txt", smollm2_dir, tmp_path / "out")
    got = result["kv_scales"]["model.layers.0.self_attn.k_scale"]
    assert np.float32(got) == np.float32(_amax_over_448(scales, offsets))
    assert got > max(scales) * 127 / 448  # wider than the symmetric range of the same scales


def test_refusals(sym_record, smollm2_dir, exported, tmp_path):
    factors = read_kv_factors(sym_record)
    del factors["model.layers.12.self_attn.k_proj"]
    write_kv_factors(tmp_path / "short.txt", factors)
    with pytest.raises(RecordMismatchError, match=r"model\.layers\.12\.self_attn\.k_proj"):
        export_vllm_fp8(tmp_path / "short.txt", smollm2_dir, tmp_path / "out")
    out, _ = exported  # already carries a quantization_config
    with pytest.raises(ExportError, match="already has a quantization_config"):
        export_vllm_fp8(sym_record, out, tmp_path / "out")
    assert not (tmp_path / "out").exists()
