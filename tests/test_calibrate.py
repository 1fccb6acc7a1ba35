import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from amct_hf import QuantCalibrationOp, calibrate_kv_cache, read_kv_factors
from amct_hf.errors import UnpatchableModelError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [{"act_algo": a, "quant_granularity": g} for a in ("ifmr", "hfmg") for g in (0, 1)]


DEVICE_CODE = {"numba": {}, "torch-path": {"AMCT_HF_FORCE_TORCH_PATH": "1"},
               "fused": {"AMCT_HF_FORCE_TORCH_PATH": "1", "AMCT_HF_FORCE_FUSED": "1"}}


@pytest.mark.parametrize("mode,code", [("streaming", "numba"), ("exact", "numba"), ("streaming", "torch-path"),
                                       ("streaming", "fused")],
                         ids=["streaming", "exact", "streaming-torch-path", "streaming-fused"])
@pytest.mark.slow
def test_two_gloo_processes_write_the_same_record_as_one(tiny_dir, tmp_path, mode, code):
    """7 samples over 2 ranks (4 + 3: uneven), batch size 2, vs 1 process with batch size 3;
    both algorithms, both granularities; also with the accelerator code forced on the CPU
    tensors (grouped, staged updates, then one reduction per entry), with the torch
    operations or the fused kernels (Triton's interpreter) counting."""
    if code == "fused":
        pytest.importorskip("triton")
    env = {**os.environ, "OMP_NUM_THREADS": "1", **DEVICE_CODE[code]}
    worker = str(ROOT / "tests" / "calibrate_worker.py")
    args = [str(tiny_dir), str(tiny_dir / "corpus.txt")]
    one = subprocess.run([sys.executable, worker, *args, str(tmp_path / "one"), json.dumps(CONFIGS), "3", mode],
                         env=env, timeout=300, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "world_size=1" in one.stdout
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    two = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", worker, *args,
                          str(tmp_path / "two"), json.dumps(CONFIGS), "2", mode],
                         env=env, timeout=300, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "rank=0 world_size=2" in two.stdout and "rank=1 world_size=2" in two.stdout
    for i, params in enumerate(CONFIGS):
        a, b = read_kv_factors(tmp_path / f"one{i}.txt"), read_kv_factors(tmp_path / f"two{i}.txt")
        assert len(a) == 4 and a == b, params


def test_exact_mode_equals_operator_fed_all_samples_as_one_batch(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from amct_hf.data.samples import load_texts, make_batches, tokenize_samples
    from amct_hf.modeling.attention import kv_calibration
    for params in CONFIGS:
        res = calibrate_kv_cache(str(tiny_dir), str(tiny_dir / "corpus.txt"), record_file=tmp_path / "d.txt",
                                 write=False,
                                 quant_algo_params=params, num_samples=6, seq_len=16, batch_size=4,
                                 mode="exact", progress=False)
        model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
        tok = AutoTokenizer.from_pretrained(tiny_dir)
        samples = tokenize_samples(tok, load_texts(str(tiny_dir / "corpus.txt")), seq_len=16, num_samples=6)
        keep = {}
        with torch.no_grad(), kv_calibration(model, lambda n, x: keep.setdefault(n, []).append(x)):
            for batch in make_batches(samples, batch_size=1, pad_token_id=tok.pad_token_id):
                model(input_ids=batch["input_ids"], use_cache=False)
        op = QuantCalibrationOp(str(tmp_path / f"op{params['act_algo']}{params['quant_granularity']}.txt"), params)
        for name, chunks in keep.items():
            op(name, torch.cat(chunks))
        assert res.factors == op.factors, params


def test_streaming_factors_do_not_depend_on_batch_size(tiny_dir, tmp_path):
    for params in CONFIGS:
        runs = [calibrate_kv_cache(str(tiny_dir), str(tiny_dir / "corpus.txt"), record_file=tmp_path / "b.txt",
                                   quant_algo_params=params, num_samples=6, seq_len=16, batch_size=b,
                                   progress=False, write=False).factors for b in (1, 4)]
        assert runs[0] == runs[1], params


def test_result_maps_layers_and_names_record(tiny_dir, tmp_path, capsys):
    rec = tmp_path / "r.txt"
    res = calibrate_kv_cache(str(tiny_dir), str(tiny_dir / "corpus.txt"), record_file=rec, num_samples=2,
                             seq_len=8, quant_algo_params={"quant_granularity": 1})
    assert res.record_file == str(rec) and read_kv_factors(rec) == res.factors
    assert len(res) == 4 and len(res["model.layers.1.self_attn.v_proj"][0]) == 32
    assert capsys.readouterr().out == ""  # a library function prints nothing
    out = res.summary()
    assert "model.layers.1.self_attn.v_proj" in out and "4 K/V entries (2 attention layers)" in out


def test_unpadded_samples_equal_padded_batches(tiny_dir, tmp_path):
    kw = dict(record_file=tmp_path / "p.txt", quant_algo_params={"quant_granularity": 1}, mode="exact",
              num_samples=8, seq_len=20, pack=False, progress=False, write=False)
    one = calibrate_kv_cache(str(tiny_dir), str(tiny_dir / "corpus.txt"), batch_size=1, **kw).factors
    padded = calibrate_kv_cache(str(tiny_dir), str(tiny_dir / "corpus.txt"), batch_size=8, **kw).factors
    for name in one:
        assert padded[name][1] == one[name][1]
        assert padded[name][0] == pytest.approx(one[name][0], rel=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    ({"model": "/nonexistent/model/dir"}, "nonexistent"),
    ({"text_column": "body"}, "body"),
    ({"seq_len": 0}, "seq_len"),
    ({"num_samples": -1}, "num_samples"),
    ({"batch_size": 0}, "batch_size"),
    ({"tap": "qkv"}, "tap"),
    ({"quant_algo_params": {"act_algo": "kl"}}, "act_algo"),
])
def test_bad_input_fails_before_any_forward(tiny_dir, tmp_path, kwargs, match, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.nn.Module, "__call__", lambda *a, **k: calls.append(1))
    base = dict(model=str(tiny_dir), dataset=str(tiny_dir / "corpus.txt"), record_file=tmp_path / "x.txt",
                num_samples=2, seq_len=8, progress=False)
    base.update(kwargs)
    model, dataset = base.pop("model"), base.pop("dataset")
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        calibrate_kv_cache(model, dataset, **base)
    assert match in str(info.value)
    assert calls == [] and not (tmp_path / "x.txt").exists()


def test_empty_dataset_fails_before_model_load(tiny_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="no text"):
        calibrate_kv_cache("/nonexistent", str(empty), record_file=tmp_path / "x.txt")


def test_unpatchable_model_is_named_before_forward(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    class Opaque(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, **kw):
            raise AssertionError("must not run")

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[PAD]": 1}, unk_token="a")),
                                  pad_token="[PAD]", unk_token="a")
    with pytest.raises(UnpatchableModelError, match="Opaque"):
        calibrate_kv_cache(Opaque(), ["a a a a"], tokenizer=tok, record_file=tmp_path / "x.txt",
                           num_samples=1, seq_len=2, progress=False)


def test_proj_tap_with_per_channel_keys_warns(tiny_dir, tmp_path):
    with pytest.warns(UserWarning, match="pre-RoPE"):
        calibrate_kv_cache(str(tiny_dir), str(tiny_dir / "corpus.txt"), record_file=tmp_path / "w.txt",
                           quant_algo_params={"quant_granularity": 1}, tap="proj", num_samples=1, seq_len=8,
                           progress=False)


def test_range_margin_widens_ranges_about_zero(tiny_dir, tmp_path):
    kw = dict(record_file=tmp_path / "m.txt", quant_algo_params={"quant_granularity": 1}, num_samples=2,
              seq_len=8, progress=False, write=False)
    base = calibrate_kv_cache(str(tiny_dir), str(tiny_dir / "corpus.txt"), **kw).factors
    wide = calibrate_kv_cache(str(tiny_dir), str(tiny_dir / "corpus.txt"), range_margin=0.25, **kw).factors
    for name, (scales, offsets) in base.items():
        assert wide[name][1] == offsets
        assert wide[name][0] == pytest.approx([s * 1.25 for s in scales], rel=1e-6)
    with pytest.raises(ValueError, match="range_margin"):
        calibrate_kv_cache(str(tiny_dir), str(tiny_dir / "corpus.txt"), range_margin=-0.1, **kw)


def test_calibration_skips_logits_of_all_but_the_last_position(tiny_dir, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import amct_hf.calibrate as calibrate_module
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    positions = []
    handle = model.lm_head.register_forward_hook(lambda m, args, out: positions.append(args[0].shape[1]))

    def run():
        return calibrate_kv_cache(model, str(tiny_dir / "corpus.txt"), tokenizer=tok, num_samples=3, seq_len=16,
                                  quant_algo_params={"quant_granularity": 1}, progress=False, write=False).factors
    try:
        spared = run()
        # the first forward runs whole, with one logit position; the other two stop once the
        # last layer's K/V are observed, before the logits
        assert positions == [1]
        positions.clear()
        monkeypatch.setattr(calibrate_module, "no_logits_kwargs", lambda m: {})
        full = run()
        assert positions == [16]
        positions.clear()
        hooks = calibrate_module.KVCalibrationHooks
        monkeypatch.setattr(calibrate_module, "KVCalibrationHooks",
                            lambda *a, **k: hooks(*a, **{**k, "stop_when_complete": False}))
        whole = run()
        assert positions == [16, 16, 16]  # every forward to the end
    finally:
        handle.remove()
    assert spared == full == whole  # the K/V statistics do not change
