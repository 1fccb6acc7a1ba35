"""lmdeploy-ascend records, read back by a re-implementation of how lmdeploy's Ascend
backend reads ASCEND_QUANT_RECORD_FILE (written from reading dlinfer's
``AscendKVQuantMeta.set_value``; not their code)."""
import re

import numpy as np
import pytest

from amct_hf.errors import ExportError
from amct_hf.export import export_lmdeploy_ascend
from amct_hf.export.lmdeploy import format_fixed_point
from amct_hf.record.files import read_kv_factors, write_kv_factors
from amct_hf.record.schema import format_record

LAYERS = 30

# What their parser does: scan the whole text for "scale:" followed by a number made of
# digits, dots and minus signs only, then whitespace, then "offset:" and an integer.
_PAIR = re.compile(r"scale:\s*([0-9.\-]+)\s*offset:\s*(-?[0-9]+)")


def lmdeploy_read(text, total_layers):
    """Per layer (k_scale, k_offset, v_scale, v_offset), as lmdeploy would use them;
    raises ValueError where lmdeploy raises (pair count neither L nor 2L)."""
    pairs = [(float(s), float(o)) for s, o in _PAIR.findall(text)]
    if len(pairs) == total_layers:  # one pair per layer, used for K and V alike
        return [(s, o, s, o) for s, o in pairs]
    if len(pairs) == 2 * total_layers:  # layer i: pair 2i is K, pair 2i+1 is V
        return [pairs[2 * i] + pairs[2 * i + 1] for i in range(total_layers)]
    raise ValueError(f"{len(pairs)} scale/offset pairs for {total_layers} layers")


@pytest.fixture
def tiny_scale_record(per_tensor_record, tmp_path):
    """The real per-tensor record with a few scales small enough to print as 4e-05, an
    offset, and its entries in a scrambled order (v before k, layer 10 before layer 2)."""
    factors = read_kv_factors(per_tensor_record)
    factors["model.layers.3.self_attn.k_proj"] = ([4e-05], [0])
    factors["model.layers.17.self_attn.v_proj"] = ([1.25e-07], [-7])
    order = sorted(factors, key=lambda n: (n.endswith("k_proj"), n))  # v first, "10" < "2"
    path = tmp_path / "per_tensor.txt"
    write_kv_factors(path, {n: factors[n] for n in order})
    return path


def test_written_record_reads_back_through_lmdeploys_parser(tiny_scale_record, tmp_path):
    record = read_kv_factors(tiny_scale_record)
    assert "e-" in format_record(record)  # AMCT/protobuf printing would use exponents ...
    with pytest.raises(ValueError, match="pairs"):
        lmdeploy_read(format_record(record), LAYERS)  # ... which this parser cannot count

    text = export_lmdeploy_ascend(tiny_scale_record, tmp_path / "lmdeploy.txt")
    assert (tmp_path / "lmdeploy.txt").read_text() == text
    assert "e-" not in text and "e+" not in text
    layers = lmdeploy_read(text, LAYERS)
    for i, (ks, ko, vs, vo) in enumerate(layers):
        (k_scale,), (k_off,) = record[f"model.layers.{i}.self_attn.k_proj"]
        (v_scale,), (v_off,) = record[f"model.layers.{i}.self_attn.v_proj"]
        assert np.float32(ks) == np.float32(k_scale) and ko == -k_off, i
        assert np.float32(vs) == np.float32(v_scale) and vo == -v_off, i
    assert layers[17][3] == 7  # dlinfer's sign: AMCT's offset -7 is written as 7
    # still the record's syntax; its scales read back unchanged, its offsets negated
    back = read_kv_factors(tmp_path / "lmdeploy.txt")
    assert back == {n: (s, [-o for o in offs]) for n, (s, offs) in record.items()}


def dlinfer_quantize(x, scale, offset):
    """dlinfer's Ascend fill_kv_cache for quant_bits 8: round(x / s - o), clamped to int8
    (round half to even, as torch.round)."""
    import torch
    return (x / scale - offset).round().clamp(-128, 127).to(torch.int8)


def npu_anti_quant(q, scale, offset):
    """torch_npu's antiquant (the attention's antiquant_scale / antiquant_offset):
    (q + offset) * scale."""
    return (q.float() + offset) * scale


@pytest.mark.parametrize("offset", [0, -7, 23, -128, 127])
def test_offsets_round_trip_through_dlinfers_quantize_and_antiquant(offset, tmp_path):
    """What lmdeploy/dlinfer compute from the written pair equals what the record means
    (AMCT: q = clip(round(x/s) + o), x_hat = (q - o) * s), for asymmetric offsets too."""
    import torch

    from amct_hf.algorithms.convention import fake_quantize

    scale = 0.0371
    name = "model.layers.{}.self_attn.{}_proj"
    factors = {name.format(i, kind): ([scale], [offset]) for i in range(2) for kind in "kv"}
    write_kv_factors(tmp_path / "rec.txt", factors)
    text = export_lmdeploy_ascend(tmp_path / "rec.txt", tmp_path / "lmdeploy.txt")
    (k_scale, k_off, _, _), _ = lmdeploy_read(text, 2)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * 3.0 + offset * scale * -0.5
    x[:3] = torch.tensor([-1e3, 1e3, 0.0])  # clipped at both ends, and zero
    s32 = torch.tensor(np.float32(k_scale))
    theirs = npu_anti_quant(dlinfer_quantize(x, s32, k_off), s32, k_off)
    ours = fake_quantize(x, torch.tensor([scale]), torch.tensor([float(offset)]))
    assert torch.equal(theirs, ours)
    if offset:  # the offset as AMCT writes it would shift every value by 2 * offset steps
        wrong = npu_anti_quant(dlinfer_quantize(x, s32, offset), s32, offset)
        assert not torch.allclose(wrong, ours, atol=scale)


def test_per_channel_record_refused_with_the_reason(sym_record, tmp_path):
    with pytest.raises(ExportError, match=r"per-channel \(192 scales\).*one scale/offset pair.*per_tensor"):
        export_lmdeploy_ascend(sym_record, tmp_path / "out.txt")
    assert not (tmp_path / "out.txt").exists()
    # Why: fed the per-channel record as AMCT prints it, the parser raises nothing; it
    # pairs each entry's LAST channel scale with its first offset.
    factors = read_kv_factors(sym_record)
    layers = lmdeploy_read(format_record(factors), LAYERS)
    k_scales = factors["model.layers.0.self_attn.k_proj"][0]
    assert np.float32(layers[0][0]) == np.float32(k_scales[-1]) != np.float32(max(k_scales))


def test_missing_value_entry_refused(per_tensor_record, tmp_path):
    factors = read_kv_factors(per_tensor_record)
    del factors["model.layers.8.self_attn.v_proj"]
    write_kv_factors(tmp_path / "rec.txt", factors)
    with pytest.raises(ExportError, match="decoder layer 8 has no value entry"):
        export_lmdeploy_ascend(tmp_path / "rec.txt", tmp_path / "out.txt")
    assert not (tmp_path / "out.txt").exists()


@pytest.mark.parametrize("x", [4e-05, 1.25e-07, 3.4028235e38, 1e-30, 0.1, 1.0, 127.5, 2.0 ** -149])
def test_fixed_point_round_trips_float32(x):
    text = format_fixed_point(x)
    assert re.fullmatch(r"[0-9]+\.[0-9]+", text), text
    assert np.float32(float(text)) == np.float32(x)
