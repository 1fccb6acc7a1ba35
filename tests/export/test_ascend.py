"""ascend-c8 on the real SmolLM2: the directory msModelSlim's KV-cache C8 flow writes
checked file by file, tensor by tensor."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from amct_hf.errors import ExportError, RecordMismatchError
from amct_hf.export import export_ascend_c8
from amct_hf.record.files import read_kv_factors, write_kv_factors

from ..tiny_models import build
from .dirs import load_dir_tensors

LAYERS, CHANNELS = 30, 3 * 64  # SmolLM2-135M: 30 layers, 3 KV heads x 64
KV_NAMES = {f"model.layers.{i}.self_attn.{p}.kv_cache_{t}"
            for i in range(LAYERS) for p in ("k_proj", "v_proj") for t in ("scale", "offset")}
META = {"kv_cache_type": "C8", "kv_quant_type": "C8", "version": "1.0.0",
        "model_quant_type": "FLOAT", "metadata": {}, "group_size": 0, "optional": {}}
COPIED = ["chat_template.jinja", "config.json", "generation_config.json", "tokenizer.json",
          "tokenizer_config.json"]


@pytest.fixture(scope="module")
def exported(sym_record, smollm2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ascend") / "smollm2-c8"
    result = export_ascend_c8(sym_record, smollm2_dir, out)
    return out, result


def _kv(tensors, layer, proj, what):
    return tensors[f"model.layers.{layer}.self_attn.{proj}.kv_cache_{what}"]


def test_file_set_is_msmodelslims(exported, smollm2_dir):
    out, result = exported
    assert sorted(os.listdir(out)) == sorted(COPIED + [
        "quant_model_description.json", "quant_model_weights-00001-of-00001.safetensors",
        "quant_model_weights.safetensors.index.json"])
    assert result["files"] == sorted(os.listdir(out))
    for name in COPIED:  # verbatim
        assert (out / name).read_bytes() == (smollm2_dir / name).read_bytes(), name
    assert not [n for n in os.listdir(out.parent) if n.startswith(".")]  # no temp dir left


def test_description_and_index(exported):
    out, _ = exported
    tensors, weight_map = load_dir_tensors(out)
    desc = json.loads((out / "quant_model_description.json").read_text())
    tensor_keys = [k for k in desc if k not in META]
    assert {k: desc[k] for k in META} == META
    assert list(desc)[-len(META):] == list(META)  # tensor entries first, as msModelSlim
    assert set(tensor_keys) == set(tensors) == set(weight_map)
    assert {k for k in tensor_keys if desc[k] == "C8"} == KV_NAMES
    assert {desc[k] for k in tensor_keys if k not in KV_NAMES} == {"FLOAT"}
    index = json.loads((out / "quant_model_weights.safetensors.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())


def test_tensors_bit_identical_and_kv_factors(exported, smollm2_dir, sym_record):
    out, _ = exported
    tensors, _ = load_dir_tensors(out)
    source = load_file(smollm2_dir / "model.safetensors")
    assert "lm_head.weight" not in source  # tied in the source ...
    assert set(tensors) == set(source) | {"lm_head.weight"} | KV_NAMES  # ... its own tensor here
    for name, t in source.items():
        assert tensors[name].dtype == t.dtype and tensors[name].shape == t.shape, name
        assert torch.equal(tensors[name].view(torch.uint8), t.view(torch.uint8)), name
    assert torch.equal(tensors["lm_head.weight"], source["model.embed_tokens.weight"])
    record = read_kv_factors(sym_record)
    for i in range(LAYERS):
        for proj in ("k_proj", "v_proj"):
            scale, offset = _kv(tensors, i, proj, "scale"), _kv(tensors, i, proj, "offset")
            assert scale.dtype == offset.dtype == torch.float32
            assert scale.shape == offset.shape == (CHANNELS,)
            scales, offsets = record[f"model.layers.{i}.self_attn.{proj}"]
            assert set(offsets) == {0}
            assert torch.equal(scale, torch.tensor(scales, dtype=torch.float32))
            assert torch.count_nonzero(offset) == 0


def test_bf16_model_gives_bf16_kv_tensors(sym_record, smollm2_dir, tmp_path):
    src = tmp_path / "smollm2-bf16"
    src.mkdir()
    for name in COPIED:
        shutil.copyfile(smollm2_dir / name, src / name)
    config = json.loads((smollm2_dir / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    weights = {k: v.to(torch.bfloat16) for k, v in load_file(smollm2_dir / "model.safetensors").items()}
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    del weights

    export_ascend_c8(sym_record, src, tmp_path / "out")
    tensors, _ = load_dir_tensors(tmp_path / "out")
    source = load_file(src / "model.safetensors")
    for name, t in source.items():
        assert tensors[name].dtype == torch.bfloat16
        assert torch.equal(tensors[name].view(torch.uint8), t.view(torch.uint8)), name
    record = read_kv_factors(sym_record)
    for name in KV_NAMES:
        assert tensors[name].dtype == torch.bfloat16 and tensors[name].shape == (CHANNELS,), name
    scales = record["model.layers.7.self_attn.v_proj"][0]
    assert torch.equal(_kv(tensors, 7, "v_proj", "scale"),
                       torch.tensor(scales, dtype=torch.float32).to(torch.bfloat16))
    assert not _kv(tensors, 7, "v_proj", "offset").any()


def test_per_tensor_record_is_broadcast(per_tensor_record, smollm2_dir, tmp_path):
    export_ascend_c8(per_tensor_record, smollm2_dir, tmp_path / "out")
    tensors, _ = load_dir_tensors(tmp_path / "out")
    record = read_kv_factors(per_tensor_record)
    for i in (0, 29):
        (s,), _ = record[f"model.layers.{i}.self_attn.k_proj"]
        scale = _kv(tensors, i, "k_proj", "scale")
        assert scale.shape == (CHANNELS,)
        assert torch.equal(scale, torch.full((CHANNELS,), s, dtype=torch.float32))


def _assert_nothing_written(parent, out):
    assert not out.exists()
    assert not [n for n in os.listdir(parent) if n.startswith(".")]


def test_asymmetric_keys_refused_nothing_created(sym_record, smollm2_dir, tmp_path):
    factors = read_kv_factors(sym_record)
    name = "model.layers.4.self_attn.k_proj"
    scales, offsets = factors[name]
    factors[name] = (scales, [0] * 10 + [-3] + offsets[11:])
    asym = tmp_path / "asym.txt"
    write_kv_factors(asym, factors)
    with pytest.raises(ExportError, match=r"model\.layers\.4\.self_attn\.k_proj.*offset -3.*symmetric keys"):
        export_ascend_c8(asym, smollm2_dir, tmp_path / "out")
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_value_offsets_of_a_model_without_o_proj_bias_refused(tmp_path):
    from amct_hf.modeling.layout import kv_layout

    model = build("qwen2")
    model.save_pretrained(tmp_path / "qwen2")
    factors = {n: ([0.01] * slot.channels, [0] * slot.channels) for n, slot in kv_layout(model).items()}
    name = next(n for n in factors if n.endswith("v_proj"))
    factors[name] = (factors[name][0], [5] * len(factors[name][0]))
    write_kv_factors(tmp_path / "rec.txt", factors)
    with pytest.raises(ExportError, match=rf"{name}.*value offsets.*qwen2 model has no o_proj bias"):
        export_ascend_c8(tmp_path / "rec.txt", tmp_path / "qwen2", tmp_path / "out")
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_mismatching_record_refused_first_layer_named(sym_record, smollm2_dir, tmp_path):
    factors = read_kv_factors(sym_record)
    missing = dict(factors)
    del missing["model.layers.3.self_attn.v_proj"], missing["model.layers.9.self_attn.k_proj"]
    rec = tmp_path / "missing.txt"
    write_kv_factors(rec, missing)
    with pytest.raises(RecordMismatchError, match=r"first mismatching layer 'model\.layers\.3\.self_attn\.v_proj'"):
        export_ascend_c8(rec, smollm2_dir, tmp_path / "out")
    wrong = dict(factors)
    wrong["model.layers.2.self_attn.k_proj"] = ([0.1] * 64, [0] * 64)  # one head's worth
    write_kv_factors(tmp_path / "wrong.txt", wrong)  # a new file: write_kv_factors merges
    with pytest.raises(RecordMismatchError, match=r"'model\.layers\.2\.self_attn\.k_proj' has 64 scales.*192"):
        export_ascend_c8(tmp_path / "wrong.txt", smollm2_dir, tmp_path / "out")
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_existing_out_dir_refused_unless_overwrite(per_tensor_record, smollm2_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty.*--overwrite"):
        export_ascend_c8(per_tensor_record, smollm2_dir, out)
    assert os.listdir(out) == ["keep.txt"]
    export_ascend_c8(per_tensor_record, smollm2_dir, out, overwrite=True)
    assert "keep.txt" not in os.listdir(out) and "quant_model_description.json" in os.listdir(out)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # the old directory is gone, no temp left
    with pytest.raises(ExportError, match="model directory"):
        export_ascend_c8(per_tensor_record, smollm2_dir, smollm2_dir.parent, overwrite=True)


def test_fused_qkv_model_names_map_to_k_proj_v_proj(tmp_path):
    """Phi-3 (fused qkv_proj) is recorded as <attn>.key_states / .value_states; its KV
    tensors are named <attn>.k_proj.* / <attn>.v_proj.*, as msModelSlim names them."""
    from amct_hf.modeling.layout import kv_layout

    model = build("phi3")
    model.save_pretrained(tmp_path / "phi3")
    layout = kv_layout(model)
    assert all(n.endswith((".key_states", ".value_states")) for n in layout)
    factors = {n: ([0.01 * (j + 1)] * slot.channels, [0] * slot.channels)
               for j, (n, slot) in enumerate(layout.items())}
    write_kv_factors(tmp_path / "rec.txt", factors)
    export_ascend_c8(tmp_path / "rec.txt", tmp_path / "phi3", tmp_path / "out")
    tensors, _ = load_dir_tensors(tmp_path / "out")
    desc = json.loads((tmp_path / "out" / "quant_model_description.json").read_text())
    for name, (scales, _) in factors.items():
        attn, kind = name.rsplit(".", 1)
        proj = "k_proj" if kind == "key_states" else "v_proj"
        assert torch.equal(tensors[f"{attn}.{proj}.kv_cache_scale"], torch.tensor(scales))
        assert desc[f"{attn}.{proj}.kv_cache_offset"] == "C8"
    assert any(n.endswith("self_attn.qkv_proj.weight") for n in tensors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_value_offsets_added_to_existing_attention_biases(tmp_path, dtype):
    """A Llama that has attention biases already: v_proj.bias and o_proj.bias are replaced by
    old - mu and old + W_o repeat_kv(mu), every other tensor is copied bit for bit. In
    bf16 the o_proj term undoes the shift the stored v_proj bias really makes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from amct_hf.modeling.layout import kv_layout

    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            torch.nn.init.normal_(module.bias)  # non-zero, so "replaced" is not "added"
    model.to(dtype).save_pretrained(tmp_path / "llama")
    factors = {}
    for j, (name, slot) in enumerate(kv_layout(model).items()):
        offsets = [0] * slot.channels if name.endswith("k_proj") else [j - 7 + (c % 3) for c in range(slot.channels)]
        factors[name] = ([0.01 * (j + 1) + 0.001 * c for c in range(slot.channels)], offsets)
    write_kv_factors(tmp_path / "rec.txt", factors)
    result = export_ascend_c8(tmp_path / "rec.txt", tmp_path / "llama", tmp_path / "out")
    assert result["folded_value_offsets"]
    tensors, _ = load_dir_tensors(tmp_path / "out")
    source = load_file(tmp_path / "llama" / "model.safetensors")
    record = read_kv_factors(tmp_path / "rec.txt")  # float32 scales, as the export reads them
    for i in range(2):
        attn = f"model.layers.{i}.self_attn"
        scales, offsets = record[f"{attn}.v_proj"]
        mu = torch.tensor([-o * s for s, o in zip(scales, offsets)], dtype=torch.float64)
        w_o = source[f"{attn}.o_proj.weight"].double()
        v_new, v_old = tensors[f"{attn}.v_proj.bias"], source[f"{attn}.v_proj.bias"]
        o_new, o_old = tensors[f"{attn}.o_proj.bias"], source[f"{attn}.o_proj.bias"]
        assert v_new.dtype == o_new.dtype == dtype
        tol = 1e-6 if dtype == torch.float32 else 2 ** -8
        shift = v_old.double() - v_new.double()  # what the stored bias really subtracts
        assert torch.allclose(shift, mu, atol=tol * (1 + v_old.double().abs().max()))
        undo = w_o @ shift.reshape(2, 16).repeat_interleave(2, dim=0).reshape(-1)
        assert torch.allclose(o_new.double(), o_old.double() + undo, atol=tol * (1 + o_new.double().abs().max()))
        assert not torch.equal(o_new, o_old)
    untouched = [n for n in source if not n.endswith(("v_proj.bias", "o_proj.bias"))]
    assert len(untouched) == len(source) - 4
    for name in untouched:
        assert torch.equal(tensors[name].view(torch.uint8), source[name].view(torch.uint8)), name
    assert set(tensors) == set(source) | {n + ".kv_cache_" + t for n in record for t in ("scale", "offset")}


def _symmetric_fake_quant(factors):
    """kv_transform callback: fake-quantize each entry with its (scale, offset) lists,
    broadcast over [batch, kv_heads, seq, head_dim]."""
    from amct_hf.algorithms.convention import fake_quantize
    from amct_hf.modeling.layout import broadcast_factor

    def transform(name, states):
        scales, offsets = factors[name]
        s = broadcast_factor(torch.tensor(scales, dtype=torch.float32), states, name)
        o = broadcast_factor(torch.tensor(offsets, dtype=torch.float32), states, name)
        return fake_quantize(states.float(), s, o).to(states.dtype)
    return transform


def test_value_offsets_folded_into_biases_serve_the_asymmetric_record(centred_record, smollm2_dir, tmp_path):
    """The folded export, read back as an engine would (attention biases from config.json,
    symmetric scales, no offsets), computes the logits of the original model under the
    asymmetric value record."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from amct_hf.modeling.attention import kv_transform

    record = read_kv_factors(centred_record)
    assert any(o for name, (_, offsets) in record.items() if name.endswith("v_proj") for o in offsets)
    assert not any(o for name, (_, offsets) in record.items() if name.endswith("k_proj") for o in offsets)
    out = tmp_path / "out"
    result = export_ascend_c8(centred_record, smollm2_dir, out)
    assert result["folded_value_offsets"]
    tensors, _ = load_dir_tensors(out)
    source = load_file(smollm2_dir / "model.safetensors")
    biases = {f"model.layers.{i}.self_attn.{p}.bias" for i in range(LAYERS)
              for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert set(tensors) == set(source) | {"lm_head.weight"} | KV_NAMES | biases
    for name, t in source.items():  # every source tensor untouched
        assert torch.equal(tensors[name].view(torch.uint8), t.view(torch.uint8)), name
    assert not any(tensors[n].any() for n in biases if ".q_proj." in n or ".k_proj." in n)
    desc = json.loads((out / "quant_model_description.json").read_text())
    assert {desc[n] for n in biases} == {"FLOAT"}
    config = json.loads((out / "config.json").read_text())
    assert config["attention_bias"] is True
    assert {k: v for k, v in config.items() if k != "attention_bias"} == \
        {k: v for k, v in json.loads((smollm2_dir / "config.json").read_text()).items() if k != "attention_bias"}

    served = {}  # what a scale-only engine quantizes with
    for name in record:
        attn, proj = name.rsplit(".", 1)
        scales = tensors[f"{attn}.{proj}.kv_cache_scale"]
        assert not tensors[f"{attn}.{proj}.kv_cache_offset"].any()
        served[name] = (scales.tolist(), [0] * len(scales))
    original = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    folded = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out)).eval()
    folded.load_state_dict({n: t for n, t in tensors.items() if ".kv_cache_" not in n}, strict=True)
    ids = torch.randint(100, 40000, (2, 48), generator=torch.Generator().manual_seed(0))

    def only(layer, factors):  # one layer quantized: rounding flips cannot compound over 30 layers
        transform = _symmetric_fake_quant(factors)
        return lambda name, states: transform(name, states) if f".layers.{layer}." in name else states

    with torch.no_grad():
        plain = original(ids).logits
        assert (folded(ids).logits - plain).abs().max() < 1e-4 * plain.abs().max()  # same model
        for layer in (0, 14, 29):
            with kv_transform(original, only(layer, record)):
                asymmetric = original(ids).logits
            with kv_transform(folded, only(layer, served)):
                engine = folded(ids).logits
            with kv_transform(original, only(layer, served)):
                unfolded = original(ids).logits
            effect = (asymmetric - plain).abs().max()
            assert effect > 1e-2, layer
            # float rounding of the folded biases flips a few values to the next grid point
            assert (engine - asymmetric).abs().max() < 0.1 * effect, layer
            assert (unfolded - asymmetric).abs().max() > 3 * (engine - asymmetric).abs().max(), layer
