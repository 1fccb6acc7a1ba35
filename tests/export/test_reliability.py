"""Exports under hostile conditions: dead channels, factors that do not survive the
model's dtype, configs the weights contradict, odd output paths, concurrent and
interrupted writers, I/O errors. Tiny Llama checkpoints, no assets."""
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from amct_hf.cli import main
from amct_hf.errors import ExportError
from amct_hf.export import export_ascend_c8
from amct_hf.export.vllm import export_vllm_fp8
from amct_hf.record.files import write_kv_factors

from ..tiny_models import build
from .dirs import load_dir_tensors

DEAD = 4  # channels of layer 0's values that never vary


@pytest.fixture
def llama_dir(tmp_path):
    model = build("llama")
    model.save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


def _layout(model_dir):
    from amct_hf.export.source_model import read_source_model
    return read_source_model(model_dir).kv_layout


def _dead_channel_record(path, layout):
    """Keys symmetric per tensor; values asymmetric per channel, layer 0's first DEAD
    channels at the calibration's zero-range placeholder (scale 1.0, offset -128)."""
    factors = {}
    for name, slot in layout.items():
        if name.endswith("k_proj"):
            factors[name] = ([0.02], [0])
        else:
            scales = [0.001 + 1e-5 * c for c in range(slot.channels)]
            offsets = [-3] * slot.channels
            if ".0." in name:
                scales[:DEAD], offsets[:DEAD] = [1.0] * DEAD, [-128] * DEAD
            factors[name] = (scales, offsets)
    write_kv_factors(path, factors)
    return factors


def test_dead_channels_do_not_widen_the_vllm_fp8_scale(llama_dir, tmp_path):
    factors = _dead_channel_record(tmp_path / "rec.txt", _layout(llama_dir))
    result = export_vllm_fp8(tmp_path / "rec.txt", llama_dir, tmp_path / "out")
    scales, offsets = factors["model.layers.0.self_attn.v_proj"]
    live = max(s * max(127 - o, o + 128) for s, o in zip(scales[DEAD:], offsets[DEAD:])) / 448
    got = result["kv_scales"]["model.layers.0.self_attn.v_scale"]
    assert got == pytest.approx(live, rel=1e-6)  # not 1.0 * 255 / 448 = 0.569


def test_dead_channels_are_not_folded_into_the_ascend_biases(llama_dir, tmp_path):
    factors = _dead_channel_record(tmp_path / "rec.txt", _layout(llama_dir))
    export_ascend_c8(tmp_path / "rec.txt", llama_dir, tmp_path / "out")
    tensors, _ = load_dir_tensors(tmp_path / "out")
    attn = "model.layers.0.self_attn"
    v_bias = tensors[f"{attn}.v_proj.bias"]
    assert torch.equal(v_bias[:DEAD], torch.zeros(DEAD))  # mu = 0, not 128
    scales, offsets = factors[f"{attn}.v_proj"]
    assert torch.allclose(v_bias[DEAD:].double(),
                          torch.tensor([o * s for s, o in zip(scales[DEAD:], offsets[DEAD:])]).double(),
                          atol=1e-6)
    # the dead channels' scale is the smallest live one: 0 stays exact, nothing widened
    kv_scale = tensors[f"{attn}.v_proj.kv_cache_scale"]
    assert torch.equal(kv_scale[:DEAD], torch.full((DEAD,), kv_scale[DEAD:].min().item()))


def test_placeholder_channels_rules():
    from amct_hf.export.checks import neutral_channel_factors, placeholder_channels

    assert placeholder_channels([1.0, 0.5, 1.0], [-128, 3, 0]) == [True, False, True]
    assert placeholder_channels([1.0, 1.0], [0, 0]) == [False, False]  # nothing else to go by
    assert placeholder_channels([1.0, 0.5], [5, 3]) == [False, False]  # offset 5 is a real range
    assert neutral_channel_factors([1.0, 0.5, 0.25], [-128, 3, -4]) == ([0.25, 0.5, 0.25], [0, 3, -4])


def test_int8_cache_serves_a_placeholder_channel_exactly():
    """The INT8 cache (and the evaluation, which fake-quantizes with the same arithmetic) uses
    the record as written: a channel that only ever held 0 gets exactly 0 back."""
    from amct_hf.modeling.cache import StaticInt8Layer

    keys = ([0.01] * 4, [0] * 4)
    values = ([1.0, 1.0, 0.01, 0.02], [-128, 0, 3, -5])  # channels 0, 1: placeholders
    layer = StaticInt8Layer(keys, values, ("k", "v"))
    k = torch.randn(1, 1, 3, 4) * 0.3
    v = torch.randn(1, 1, 3, 4) * 0.3
    v[..., :2] = 0.0
    _, v_hat = layer.update(k, v)
    assert torch.equal(v_hat[..., :2], torch.zeros(1, 1, 3, 2))
    assert torch.allclose(v_hat[..., 2:], v[..., 2:], atol=0.011)


def test_exported_bf16_model_with_dead_channels_keeps_its_logits(tmp_path):
    """The issue's case: all-zero v_proj rows, asymmetric per-channel values, a bf16 model.
    Without quantization the exported model (value centres folded into its biases) must
    compute what the original computes, up to bf16 rounding."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = build("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[:DEAD] = 0.0
    model.to(torch.bfloat16).save_pretrained(tmp_path / "m")
    _dead_channel_record(tmp_path / "rec.txt", _layout(tmp_path / "m"))
    export_ascend_c8(tmp_path / "rec.txt", tmp_path / "m", tmp_path / "out")
    ids = torch.arange(24).reshape(2, 12) % 96
    exported = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path / "out"),
                                                dtype=torch.bfloat16).eval()
    tensors, _ = load_dir_tensors(tmp_path / "out")
    exported.load_state_dict({n: t for n, t in tensors.items() if ".kv_cache_" not in n}, strict=True)
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        diff = (exported(input_ids=ids).logits.float() - original(input_ids=ids).logits.float()).abs()
    assert diff.max().item() < 0.02, diff.max().item()


def _per_tensor_record(path, layout, key=(0.02, 0), value=(0.03, 0)):
    factors = {n: ([key[0]], [key[1]]) if n.endswith("k_proj") else ([value[0]], [value[1]]) for n in layout}
    write_kv_factors(path, factors)


@pytest.mark.parametrize("dtype, key, value, fmt, match", [
    (torch.float16, (1e-30, 0), (0.03, 0), "ascend-c8", r"k_proj\.kv_cache_scale.*not positive"),
    (torch.float16, (1e38, 0), (0.03, 0), "ascend-c8", r"k_proj\.kv_cache_scale.*not finite"),
    (torch.bfloat16, (1e-45, 0), (0.03, 0), "ascend-c8", r"k_proj\.kv_cache_scale.*not positive"),
    (torch.float16, (1e-6, 0), (0.03, 0), "ascend-c8", r"k_proj\.kv_cache_scale.*subnormal"),
    (torch.float32, (0.02, 0), (1e38, 5), "ascend-c8", r"layers\.0\.self_attn\.(v|o)_proj\.bias.*not finite"),
    (torch.float32, (1e-45, 0), (0.03, 0), "vllm-fp8", r"layers\.0\.self_attn\.k_scale.*not positive"),
])
def test_exported_tensors_are_checked_in_the_models_dtype(tmp_path, dtype, key, value, fmt, match):
    model = build("llama").to(dtype)
    model.save_pretrained(tmp_path / "m")
    _per_tensor_record(tmp_path / "rec.txt", _layout(tmp_path / "m"), key, value)
    export = export_ascend_c8 if fmt == "ascend-c8" else export_vllm_fp8
    with pytest.raises(ExportError, match=match):
        export(tmp_path / "rec.txt", tmp_path / "m", tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["m", "rec.txt"]


@pytest.mark.parametrize("fmt", ["ascend-c8", "vllm-fp8"])
def test_kv_geometry_is_checked_against_the_projection_weights(llama_dir, tmp_path, fmt):
    layout = _layout(llama_dir)
    _per_tensor_record(tmp_path / "rec.txt", layout)
    config = json.loads((llama_dir / "config.json").read_text())
    del config["num_key_value_heads"]  # the model built from it gets 4 KV heads; the weights have 2
    (llama_dir / "config.json").write_text(json.dumps(config))
    export = export_ascend_c8 if fmt == "ascend-c8" else export_vllm_fp8
    with pytest.raises(ExportError, match=r"k_proj\.weight has 32 output rows.*64 channels"):
        export(tmp_path / "rec.txt", llama_dir, tmp_path / "out")


def test_out_inside_the_model_folder_is_refused(llama_dir, tmp_path):
    _per_tensor_record(tmp_path / "rec.txt", _layout(llama_dir))
    before = sorted(os.listdir(llama_dir))
    with pytest.raises(ExportError, match="inside the model directory"):
        export_ascend_c8(tmp_path / "rec.txt", llama_dir, llama_dir / "c8")
    assert sorted(os.listdir(llama_dir)) == before


def test_symlinked_out_is_followed_and_kept(llama_dir, tmp_path):
    _per_tensor_record(tmp_path / "rec.txt", _layout(llama_dir))
    (tmp_path / "real").mkdir()
    (tmp_path / "links").mkdir()
    link = tmp_path / "links" / "out"
    link.symlink_to(tmp_path / "real")
    result = export_vllm_fp8(tmp_path / "rec.txt", llama_dir, link)
    assert link.is_symlink() and os.path.realpath(link) == str(tmp_path / "real")
    assert "config.json" in os.listdir(tmp_path / "real")
    assert result["out_dir"] == str(tmp_path / "real")
    assert os.listdir(tmp_path / "links") == ["out"]  # no .out.old-* beside the link
    assert sorted(os.listdir(tmp_path)) == ["links", "llama", "real", "rec.txt"]


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_dead_writers_temp_directories_are_removed(llama_dir, tmp_path):
    _per_tensor_record(tmp_path / "rec.txt", _layout(llama_dir))
    stale = tmp_path / f".out.tmp-{_dead_pid()}-0123abcd"
    stale.mkdir()
    (stale / "model-00001-of-00001.safetensors").write_bytes(b"partial")
    live = tmp_path / f".out.tmp-{os.getppid()}-0123abcd"  # a live process's: kept
    live.mkdir()
    export_vllm_fp8(tmp_path / "rec.txt", llama_dir, tmp_path / "out")
    assert not stale.exists() and live.exists()


# A writer that stops inside its shard writing (after its checks) until told to go on.
_PAUSED_WRITER = textwrap.dedent("""
    import os, sys, time
    import amct_hf.export.model_dir as md
    from amct_hf.cli import main
    ready, go = sys.argv[1], sys.argv[2]
    original = md._write_shard
    def paused(*args, **kwargs):
        open(ready, "w").close()
        while not os.path.exists(go):
            time.sleep(0.02)
        return original(*args, **kwargs)
    md._write_shard = paused
    sys.exit(main(sys.argv[3:]))
""")


def _start_paused(tmp_path, argv):
    ready, go = tmp_path / "ready", tmp_path / "go"
    proc = subprocess.Popen([sys.executable, "-c", _PAUSED_WRITER, str(ready), str(go), *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    return proc, go


def test_sigterm_during_an_export_leaves_no_temp_directory(llama_dir, tmp_path):
    _per_tensor_record(tmp_path / "rec.txt", _layout(llama_dir))
    out = tmp_path / "exports" / "out"
    proc, _ = _start_paused(tmp_path, ["export", "--record", str(tmp_path / "rec.txt"), "--format",
                                       "vllm-fp8", "--model", str(llama_dir), "--out", str(out)])
    proc.send_signal(signal.SIGTERM)
    proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM
    assert os.listdir(tmp_path / "exports") == []


def test_two_exports_to_one_out_the_later_rename_is_refused(llama_dir, tmp_path):
    """A passes its checks and writes; B writes the same --out completely; A's final rename
    must see B's directory and refuse, not replace it."""
    _per_tensor_record(tmp_path / "a.txt", _layout(llama_dir), key=(0.02, 0))
    _per_tensor_record(tmp_path / "b.txt", _layout(llama_dir), key=(0.05, 0))
    out = tmp_path / "out"
    common = ["--format", "vllm-fp8", "--model", str(llama_dir), "--out", str(out)]
    a, go = _start_paused(tmp_path, ["export", "--record", str(tmp_path / "a.txt"), *common])
    b = subprocess.run([sys.executable, "-m", "amct_hf.cli", "export", "--record", str(tmp_path / "b.txt"),
                        *common], capture_output=True, text=True)
    assert b.returncode == 0, b.stderr
    go.touch()
    _, err = a.communicate()
    assert a.returncode == 2, err
    assert "not empty" in err and len(err.strip().splitlines()) == 1
    tensors, _ = load_dir_tensors(out)
    assert tensors["model.layers.0.self_attn.k_scale"].item() == pytest.approx(0.05 * 128 / 448)
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".")) == []


@pytest.mark.parametrize("fmt", ["json", "safetensors", "lmdeploy-ascend", "ascend-c8", "vllm-fp8"])
def test_disk_full_is_one_line_exit_2_nothing_left(llama_dir, tmp_path, monkeypatch, capsys, fmt):
    _per_tensor_record(tmp_path / "rec.txt", _layout(llama_dir))
    out_parent = tmp_path / "exports"
    out_parent.mkdir()
    out = out_parent / ("out" if fmt in ("ascend-c8", "vllm-fp8") else "out.file")

    def full(fd):  # every writer makes its data durable before the rename: fail there
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)
    argv = ["export", "--record", str(tmp_path / "rec.txt"), "--format", fmt, "--out", str(out)]
    if fmt in ("ascend-c8", "vllm-fp8"):
        argv += ["--model", str(llama_dir)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "No space left on device" in err and str(out) in err
    assert os.listdir(out_parent) == []


def test_out_under_a_regular_file_is_one_line(llama_dir, tmp_path, capsys):
    _per_tensor_record(tmp_path / "rec.txt", _layout(llama_dir))
    (tmp_path / "file").write_text("x")
    assert main(["export", "--record", str(tmp_path / "rec.txt"), "--format", "vllm-fp8",
                 "--model", str(llama_dir), "--out", str(tmp_path / "file" / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(tmp_path / "file") in err, err


def test_lmdeploy_refuses_a_record_of_another_layer_count(tmp_path, capsys):
    model = build("llama")  # 2 layers
    model.config.num_hidden_layers = 3  # a config of 3 layers beside a 2-layer record
    model.config.save_pretrained(tmp_path / "m3")
    factors = {f"model.layers.{i}.self_attn.{p}": ([0.02], [0]) for i in range(2) for p in ("k_proj", "v_proj")}
    write_kv_factors(tmp_path / "rec.txt", factors)
    out = tmp_path / "rec.lmdeploy.txt"
    assert main(["export", "--record", str(tmp_path / "rec.txt"), "--format", "lmdeploy-ascend",
                 "--model", str(tmp_path / "m3"), "--out", str(out)]) == 2
    assert "2 decoder layer(s), but the model has 3" in capsys.readouterr().err
    assert not out.exists()
    model.config.num_hidden_layers = 2
    model.config.save_pretrained(tmp_path / "m2")
    assert main(["export", "--record", str(tmp_path / "rec.txt"), "--format", "lmdeploy-ascend",
                 "--model", str(tmp_path / "m2"), "--out", str(out)]) == 0
    assert "2 layers, as the model" in capsys.readouterr().out


def test_report_does_not_flag_placeholder_channels_as_outliers():
    from amct_hf.evaluation.report import layer_clip_stats

    live = [0.01 + 0.001 * c for c in range(8)]
    stats = layer_clip_stats([1.0, 1.0, *live], [-128, -128, *([-3] * 8)])
    assert not stats["outlier"] and stats["worst_channel"] == 9
    assert stats["x_min"][:2] == stats["x_max"][:2] == [0.0, 0.0]


def test_record_holding_another_models_entries_says_how(llama_dir, tmp_path):
    from amct_hf.errors import RecordMismatchError

    layout = _layout(llama_dir)
    factors = {n: ([0.02], [0]) for n in layout}
    factors.update({f"other.layers.{i}.self_attn.k_proj": ([0.02], [0]) for i in range(3)})
    write_kv_factors(tmp_path / "rec.txt", factors)
    with pytest.raises(RecordMismatchError, match=r"3 record entries belong to no layer.*own --record"):
        export_vllm_fp8(tmp_path / "rec.txt", llama_dir, tmp_path / "out")


def test_export_model_that_is_a_file_is_named_as_such(tmp_path, capsys):
    write_kv_factors(tmp_path / "rec.txt", {"model.layers.0.self_attn.k_proj": ([0.02], [0])})
    (tmp_path / "model.safetensors").write_bytes(b"x")
    assert main(["export", "--record", str(tmp_path / "rec.txt"), "--format", "ascend-c8", "--model",
                 str(tmp_path / "model.safetensors"), "--out", str(tmp_path / "out")]) == 2
    assert "is a file; pass the folder" in capsys.readouterr().err
