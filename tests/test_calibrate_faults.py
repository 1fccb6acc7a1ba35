"""Faults the driver must stop on at once : NaN/Inf activations,
fp16 overflow, bad stream_bins, models and files that cannot be loaded."""
import contextlib

import pytest
import torch

from amct_hf import calibrate_kv_cache
from amct_hf.algorithms import kernels
from amct_hf.cli import main
from amct_hf.errors import CalibrationInputError, InvalidArgumentError, ModelLoadError


def _poisoned(tiny_dir, tmp_path, *, value=float("nan"), dtype=torch.float32, name="poisoned"):
    """A copy of the tiny model with one bad weight in layer 1's v_proj (NaN), or with k_proj
    weights that overflow float16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=dtype)
    with torch.no_grad():
        if value != value:
            model.model.layers[1].self_attn.v_proj.weight[3, 5] = value
        else:
            model.model.layers[1].self_attn.k_proj.weight.fill_(value)
    out = tmp_path / name
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(out)
    return out


@pytest.mark.parametrize("algo", ["ifmr", "hfmg"])
@pytest.mark.parametrize("mode", ["streaming", "exact"])
@pytest.mark.parametrize("tap", ["cache", "proj"])
@pytest.mark.parametrize("granularity", [0, 1])
def test_nan_activation_stops_at_the_first_batch_naming_layer(tiny_dir, tmp_path, algo, mode, tap,
                                                              granularity):
    model = _poisoned(tiny_dir, tmp_path)
    rec = tmp_path / "kv.txt"
    batches = []
    from amct_hf.observers import base
    original = base.check_activation

    def counting(name, x, batch=None):
        batches.append(batch)
        return original(name, x, batch)

    # tap='proj' with per-channel factors warns (pre-RoPE keys); that warning is not under test
    expected = pytest.warns(UserWarning, match="pre-RoPE") if tap == "proj" and granularity == 1 \
        else contextlib.nullcontext()
    with pytest.MonkeyPatch.context() as m, expected:
        m.setattr(base, "check_activation", counting)
        with pytest.raises(CalibrationInputError,
                           match=r"'model.layers.1.self_attn.v_proj', batch 1: .*NaN"):
            calibrate_kv_cache(str(model), str(tiny_dir / "corpus.txt"), record_file=rec,
                               quant_algo_params={"act_algo": algo, "quant_granularity": granularity},
                               num_samples=4, seq_len=16, mode=mode, tap=tap, progress=False)
    assert not rec.exists()
    assert max(b for b in batches) == 1  # stopped inside the first forward pass


def test_nan_stops_the_same_on_the_torch_path(tiny_dir, tmp_path, monkeypatch):
    model = _poisoned(tiny_dir, tmp_path)
    monkeypatch.setattr(kernels, "AVAILABLE", False)  # the GPU-style (torch) code paths
    with pytest.raises(CalibrationInputError, match="v_proj', batch 1: .*NaN"):
        calibrate_kv_cache(str(model), str(tiny_dir / "corpus.txt"), record_file=tmp_path / "kv.txt",
                           num_samples=2, seq_len=16, progress=False)
    assert not (tmp_path / "kv.txt").exists()


def test_fp16_overflow_names_inf_and_the_hint(tiny_dir, tmp_path):
    model = _poisoned(tiny_dir, tmp_path, value=3e3, dtype=torch.float16, name="fp16")
    with pytest.raises(CalibrationInputError, match=r"k_proj', batch [12]: .*Inf.*float16 overflow.*float32 "
                                                    r"or bfloat16"):
        calibrate_kv_cache(str(model), str(tiny_dir / "corpus.txt"), record_file=tmp_path / "kv.txt",
                           num_samples=2, seq_len=16, dtype="float16", progress=False, write=False)


def test_cli_nan_model_is_one_line_and_writes_nothing(tiny_dir, tmp_path, capsys):
    model = _poisoned(tiny_dir, tmp_path)
    rec = tmp_path / "kv.txt"
    capsys.readouterr()
    rc = main(["calibrate", "--model", str(model), "--dataset", str(tiny_dir / "corpus.txt"),
               "--num-samples", "2", "--seq-len", "16", "--record", str(rec), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not rec.exists()
    assert len(err) == 1 and "v_proj', batch 1" in err[0] and "NaN" in err[0]


@pytest.mark.parametrize("bins", [-5, 0, 1, 3, 1.5, True, 10 ** 9])
def test_stream_bins_is_validated_before_any_work(tiny_dir, tmp_path, bins):
    with pytest.raises(InvalidArgumentError, match=f"stream_bins={bins!r} is not allowed"):
        calibrate_kv_cache(str(tiny_dir), str(tiny_dir / "corpus.txt"), record_file=tmp_path / "kv.txt",
                           num_samples=2, seq_len=16, stream_bins=bins, progress=False)


def test_seq_len_beyond_the_model_context_warns(tiny_dir, tmp_path):
    with pytest.warns(UserWarning, match="exceeds the model's max_position_embeddings=128"):
        calibrate_kv_cache(str(tiny_dir), ["alpha beta gamma " * 100], num_samples=1, seq_len=200,
                           progress=False, write=False)


def test_too_little_text_is_stated_in_the_result(tiny_dir):
    res = calibrate_kv_cache(str(tiny_dir), ["alpha beta gamma delta"], num_samples=4, seq_len=16,
                             progress=False, write=False)
    assert res.num_samples == 1 and res.num_tokens == 4
    assert res.shortfall and "asked for 4 x 16 tokens" in res.shortfall
    assert f"warning: {res.shortfall}" in res.summary()


@pytest.mark.parametrize("damage", ["truncated", "pickle"])
def test_unreadable_weights_are_one_line_naming_the_folder(tiny_dir, tmp_path, damage, capsys):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    weights = broken / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        weights.unlink()
        (broken / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    capsys.readouterr()
    with pytest.raises(ModelLoadError, match=f"cannot load model '{broken}'"):
        calibrate_kv_cache(str(broken), str(tiny_dir / "corpus.txt"), num_samples=1, seq_len=8,
                           progress=False, write=False)
    rc = main(["calibrate", "--model", str(broken), "--dataset", str(tiny_dir / "corpus.txt"),
               "--num-samples", "1", "--seq-len", "8", "--record", str(tmp_path / "kv.txt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(broken) in err[0]


def test_path_like_model_that_does_not_exist_fails_at_once(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder 'path/to/llama-or-qwen' does not exist"):
        calibrate_kv_cache("path/to/llama-or-qwen", ["some text"], progress=False, write=False)


def test_cli_keeps_the_traceback_of_a_bug(tiny_dir, tmp_path, monkeypatch):
    import amct_hf.calibrate as driver

    def broken(*args, **kwargs):
        raise RuntimeError("a bug, not a user error")
    monkeypatch.setattr(driver, "calibrate_kv_cache", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["calibrate", "--model", str(tiny_dir), "--dataset", str(tiny_dir / "corpus.txt"),
              "--record", str(tmp_path / "kv.txt")])
