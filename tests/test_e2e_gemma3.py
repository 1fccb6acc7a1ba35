"""End to end on the real Gemma 3 270M: an architecture unlike SmolLM2's Llama (one KV head
of head_dim 256, QK-norm, sliding-window layers interleaved with full-attention ones, tied
embeddings). Every target calibrates an entry for every attention layer, and the records
export for the engines. Small settings (4 x 128 tokens) keep it to about a minute."""
import json
import math

import pytest

from amct_hf.calibrate import calibrate_kv_cache
from amct_hf.data.bundled import news_corpus_path
from amct_hf.export import export_ascend_c8, export_vllm_fp8
from amct_hf.record.files import read_kv_factors

pytestmark = pytest.mark.slow

LAYERS, HEAD_DIM = 18, 256  # one KV head
KEYS = [f"model.layers.{i}.self_attn.{kv}_proj" for i in range(LAYERS) for kv in "kv"]


def test_the_converted_model_has_the_features_under_test(gemma3_dir):
    config = json.loads((gemma3_dir / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"]
    assert config["num_hidden_layers"] == LAYERS and config["num_key_value_heads"] == 1
    assert config["head_dim"] == HEAD_DIM and config["tie_word_embeddings"]
    assert {"sliding_attention", "full_attention"} <= set(config["layer_types"])


@pytest.fixture(scope="module")
def records(gemma3_dir, tmp_path_factory):
    out = {}
    for target in ("transformers", "ascend-c8", "vllm-fp8"):
        rec = tmp_path_factory.mktemp("gemma3") / f"{target}.txt"
        result = calibrate_kv_cache(str(gemma3_dir), str(news_corpus_path()), record_file=rec,
                                    target=target, num_samples=4, seq_len=128, progress=False)
        assert result.num_samples == 4 and result.num_tokens == 4 * 128
        out[target] = rec, result
    return out


@pytest.mark.parametrize("target", ["transformers", "ascend-c8", "vllm-fp8"])
def test_every_attention_layer_has_an_entry(records, target):
    rec, result = records[target]
    assert list(result.factors) == KEYS  # layer order, k before v
    on_disk = read_kv_factors(rec)
    assert sorted(on_disk) == sorted(KEYS)
    for name, (scales, offsets) in on_disk.items():
        # per-tensor (1 entry) or per-channel over the one KV head (256 entries)
        assert len(scales) == len(offsets) in (1, HEAD_DIM), name
        assert all(math.isfinite(s) and s > 0 for s in scales), name
        assert all(-128 <= o <= 127 for o in offsets), name
        if target != "transformers":  # both engines' targets are symmetric
            assert set(offsets) == {0}, name
    if target == "transformers":  # asymmetric: some layer has a non-zero zero point
        assert any(o != 0 for _, offsets in on_disk.values() for o in offsets)


def test_ascend_c8_export(records, gemma3_dir, tmp_path):
    rec, _ = records["ascend-c8"]
    result = export_ascend_c8(rec, gemma3_dir, tmp_path / "c8")
    names = set(result["kv_tensors"])
    for i in range(LAYERS):
        for proj in ("k_proj", "v_proj"):
            assert f"model.layers.{i}.self_attn.{proj}.kv_cache_scale" in names, (i, proj)
    assert json.loads((tmp_path / "c8" / "quant_model_description.json").read_text())


def test_vllm_fp8_export(records, gemma3_dir, tmp_path):
    rec, _ = records["vllm-fp8"]
    result = export_vllm_fp8(rec, gemma3_dir, tmp_path / "fp8")
    assert sorted(result["kv_scales"]) == sorted(
        f"model.layers.{i}.self_attn.{kv}" for i in range(LAYERS) for kv in ("k_scale", "v_scale"))
    assert all(math.isfinite(s) and s > 0 for s in result["kv_scales"].values())
    assert "quantization_config" in json.loads((tmp_path / "fp8" / "config.json").read_text())
