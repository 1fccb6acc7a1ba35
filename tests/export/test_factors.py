"""Export of record KV factors to JSON / safetensors: exact round trip, layout, CLI."""
import json
import random
import struct

import pytest

from amct_hf.cli import main
from amct_hf.export.factors import export_json, export_safetensors, load_export
from amct_hf.record.files import read_kv_factors, write_kv_factors

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")


def bits(xs):
    return [struct.pack("<f", x) for x in xs]


def random_factors(seed=0, n_layers=3, channels=8):
    """k_proj per channel and v_proj per tensor for some layers, the reverse for others,
    plus one name the export cannot classify."""
    rng = random.Random(seed)
    out = {}
    for i in range(n_layers):
        for proj, per_channel in (("k_proj", i % 2 == 0), ("v_proj", i % 2 == 1)):
            c = channels if per_channel else 1
            # log-uniform over many decades: exercises float32 values with long reprs
            scales = [10 ** rng.uniform(-6, 2) for _ in range(c)]
            offsets = [rng.randint(-128, 127) for _ in range(c)]
            out[f"model.layers.{i}.self_attn.{proj}"] = (scales, offsets)
    out["model.layers.0.self_attn.kv_cache"] = ([0.125, 3.0], [0, -7])
    return out


@pytest.fixture
def record(tmp_path):
    path = tmp_path / "kv_cache.txt"
    write_kv_factors(path, random_factors())
    return path


def assert_exact(got, want):
    assert set(got) == set(want)
    for name, (scales, offsets) in want.items():
        g_scales, g_offsets = got[name]
        assert bits(g_scales) == bits(scales), name
        assert g_scales == scales, name  # also equal as Python floats (already float32)
        assert g_offsets == offsets and all(type(o) is int for o in g_offsets), name


def test_json_round_trip_and_fields(record, tmp_path):
    out = tmp_path / "out" / "factors.json"
    doc = export_json(record, out)
    want = read_kv_factors(record)
    assert_exact(load_export(out), want)
    on_disk = json.loads(out.read_text())
    assert on_disk == doc
    assert on_disk["format"] == "amct_hf.kv_cache_factors" and on_disk["version"] == 1
    assert list(on_disk["layers"]) == list(want)  # record order kept
    layers = on_disk["layers"]
    assert layers["model.layers.0.self_attn.k_proj"]["granularity"] == "per_channel"
    assert layers["model.layers.0.self_attn.k_proj"]["kind"] == "key"
    assert layers["model.layers.0.self_attn.v_proj"]["granularity"] == "per_tensor"
    assert layers["model.layers.0.self_attn.v_proj"]["kind"] == "value"
    assert layers["model.layers.1.self_attn.k_proj"]["granularity"] == "per_tensor"
    assert layers["model.layers.1.self_attn.v_proj"]["granularity"] == "per_channel"
    assert layers["model.layers.0.self_attn.kv_cache"]["kind"] == "unknown"
    for name, entry in layers.items():
        assert len(entry["scale"]) == len(entry["offset"]) == len(want[name][0])


def test_safetensors_round_trip_and_layout(record, tmp_path):
    out = tmp_path / "factors.safetensors"
    tensors = export_safetensors(record, out)
    want = read_kv_factors(record)
    assert_exact(load_export(out), want)

    loaded = safetensors_torch.load_file(str(out))
    expected_names = {f"{n}.kv_cache_scale" for n in want} | {f"{n}.kv_cache_offset" for n in want}
    assert set(loaded) == set(tensors) == expected_names
    assert "model.layers.0.self_attn.k_proj.kv_cache_scale" in loaded
    for name, (scales, offsets) in want.items():
        s, o = loaded[f"{name}.kv_cache_scale"], loaded[f"{name}.kv_cache_offset"]
        assert s.dtype == torch.float32 and s.shape == (len(scales),)
        assert o.dtype == torch.int32 and o.shape == (len(offsets),)
        assert bits(s.tolist()) == bits(scales) and o.tolist() == offsets
    from safetensors import safe_open
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"format": "amct_hf.kv_cache_factors",
                                "source_record": "kv_cache.txt"}


def test_spec_example_values_exact(tmp_path):
    # The SPEC §4 example: shortest-repr float32 text values survive both exports.
    rec = tmp_path / "spec.txt"
    rec.write_text('record {\n  key: "model.layers.0.self_attn.k_proj"\n  kv_cache_value {\n'
                   + "".join(f"    scale: {s}\n" for s in
                             ("0.027280478", "0.032344416", "0.031658996", "0.033162832"))
                   + "".join(f"    offset: {o}\n" for o in (-18, -46, -55, -69)) + "  }\n}\n")
    want = read_kv_factors(rec)
    for ext, fn in ((".json", export_json), (".safetensors", export_safetensors)):
        fn(rec, tmp_path / f"e{ext}")
        assert_exact(load_export(tmp_path / f"e{ext}"), want)


def test_empty_and_missing_record(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text('record {\n  key: "conv1"\n  value {\n    scale_d: 0.5\n  }\n}\n')
    for fn in (export_json, export_safetensors):
        with pytest.raises(ValueError, match="empty.txt.*no kv_cache_value"):
            fn(empty, tmp_path / "o.json")
        with pytest.raises(FileNotFoundError, match="nope.txt"):
            fn(tmp_path / "nope.txt", tmp_path / "o.json")
    assert not (tmp_path / "o.json").exists()


def test_load_export_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_export(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="json or .safetensors"):
        load_export(tmp_path / "factors.txt")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something.else", "layers": {}}))
    with pytest.raises(ValueError, match="format"):
        load_export(bad)


def test_cli_export_json(record, tmp_path, capsys):
    out = tmp_path / "cli.json"
    rc = main(["export", "--record", str(record), "--format", "json", "--out", str(out)])
    assert rc == 0
    assert_exact(load_export(out), read_kv_factors(record))
    printed = capsys.readouterr().out
    assert str(out) in printed and "7 K/V entries" in printed


def test_cli_export_default_out(record, capsys):
    rc = main(["export", "--record", str(record), "--format", "safetensors"])
    assert rc == 0
    out = record.with_suffix(".safetensors")
    assert out.is_file()
    assert_exact(load_export(out), read_kv_factors(record))


def test_cli_export_missing_record(tmp_path, capsys):
    missing = tmp_path / "no_such_record.txt"
    rc = main(["export", "--record", str(missing), "--format", "json",
               "--out", str(tmp_path / "x.json")])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "error" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("edit, problem", [
    (lambda e: e["scale"].__setitem__(0, float("nan")), "scale"),
    (lambda e: e["scale"].__setitem__(0, -1.0), "scale"),
    (lambda e: e["scale"].__setitem__(0, 0.0), "scale"),
    (lambda e: e["offset"].__setitem__(0, 1000), "offset"),
    (lambda e: e["offset"].__setitem__(0, 2 ** 40), "offset"),
])
def test_load_export_refuses_what_the_exporter_refuses(record, tmp_path, edit, problem):
    out = tmp_path / "kv.json"
    export_json(record, out)
    doc = json.loads(out.read_text())
    edit(doc["layers"]["model.layers.0.self_attn.k_proj"])
    out.write_text(json.dumps(doc))  # json writes NaN as NaN: a hand-edited file
    from amct_hf.errors import ExportError
    with pytest.raises(ExportError, match=rf"k_proj' has unusable factors: {problem}\[0\]"):
        load_export(out)


def test_safetensors_export_is_the_same_bytes_in_every_process(tmp_path):
    import subprocess
    import sys

    from amct_hf.record.files import write_kv_factors
    rec = tmp_path / "r.txt"
    write_kv_factors(rec, {f"model.layers.{i}.self_attn.{kv}_proj": ([0.01 * (i + 1)], [i])
                           for i in range(3) for kv in "kv"})
    code = "import sys; from amct_hf.export.factors import export_safetensors; export_safetensors(*sys.argv[1:])"
    outs = []
    for i in range(6):  # the safetensors library's metadata order changes between processes
        out = tmp_path / f"f{i}.safetensors"
        subprocess.run([sys.executable, "-c", code, str(rec), str(out)], check=True, timeout=120)
        outs.append(out.read_bytes())
    assert all(o == outs[0] for o in outs)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "f0.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "amct_hf.kv_cache_factors", "source_record": "r.txt"}
        assert float(f.get_tensor("model.layers.2.self_attn.v_proj.kv_cache_scale")[0]) == pytest.approx(0.03)
