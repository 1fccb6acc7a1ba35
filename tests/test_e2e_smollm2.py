"""End to end on the real SmolLM2-135M and the real news corpus: Python API, CLI, recipe.

Small settings (a few samples of 64-128 tokens, one batch) keep the runs short on 2 CPU
cores. The costly part on CPU is not the forward pass but the per-layer work: a histogram
update per batch and, for per-channel streaming IFMR, a solve of 192 channels x 60 entries
(tens of seconds). So per-channel runs here in exact mode (the API test), the rest is
per-tensor; the recipes' per-channel defaults run on a tiny model in test_cli.py.
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from amct_hf.calibrate import calibrate_kv_cache
from amct_hf.cli import main
from amct_hf.data.bundled import news_corpus_path
from amct_hf.record.files import read_kv_factors

pytestmark = pytest.mark.slow

LAYERS, KV_CHANNELS = 30, 3 * 64  # 3 KV heads x head_dim 64
KEYS = [f"model.layers.{i}.self_attn.{kv}_proj" for i in range(LAYERS) for kv in "kv"]
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _check_record(factors, channels=KV_CHANNELS):
    assert sorted(factors) == sorted(KEYS)
    for name, (scales, offsets) in factors.items():
        assert len(scales) == len(offsets) == channels, name
        assert all(math.isfinite(s) and s > 0 for s in scales), name
        assert all(-128 <= o <= 127 for o in offsets), name


def test_python_api_per_channel(smollm2_dir, tmp_path):
    rec = tmp_path / "kv_cache.txt"
    result = calibrate_kv_cache(
        str(smollm2_dir), str(news_corpus_path()), record_file=rec,
        quant_algo_params={"act_algo": "ifmr", "quant_granularity": "per_channel"},
        num_samples=4, seq_len=128, batch_size=4, mode="exact", progress=False)
    assert list(result.factors) == KEYS  # layer order, k before v
    assert result.num_samples == 4 and result.num_tokens == 4 * 128
    _check_record(result.factors)
    on_disk = read_kv_factors(rec)
    _check_record(on_disk)
    for name in KEYS:  # the record holds float32 of what was computed
        assert on_disk[name][1] == result.factors[name][1]
        assert on_disk[name][0] == pytest.approx(result.factors[name][0], rel=1e-6)


def test_cli_on_news_corpus(smollm2_dir, tmp_path):
    rec = tmp_path / "kv_cache.txt"
    rc = main(["calibrate", "--model", str(smollm2_dir), "--dataset", str(news_corpus_path()),
               "--num-samples", "2", "--seq-len", "128", "--batch-size", "2", "--algo", "hfmg",
               "--granularity", "per_tensor", "--record", str(rec), "--no-progress"])
    assert rc == 0
    _check_record(read_kv_factors(rec), channels=1)


def test_llama_recipe_subprocess(smollm2_dir, tmp_path):
    rec = tmp_path / "recipe.txt"
    proc = subprocess.run(
        [sys.executable, str(RECIPES / "llama.py"), "--model", str(smollm2_dir),
         "--num-samples", "2", "--seq-len", "64", "--batch-size", "2", "--record", str(rec),
         # overriding QUANT_ALGO_PARAMS from the command line: per-tensor keeps it quick
         "--params", '{"act_algo": "ifmr", "quant_granularity": "per_tensor", "asymmetric": false}'],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
             "TRANSFORMERS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    factors = read_kv_factors(rec)
    _check_record(factors, channels=1)
    assert all(offsets == [0] for _, offsets in factors.values())  # symmetric, as overridden
    assert "60 K/V entries (30 attention layers), 2 samples, 128 tokens" in proc.stdout


def test_cli_embedded_defaults(smollm2_dir, tmp_path, monkeypatch, capsys):
    # no --model/--dataset: the bundled SmolLM2 and news corpus. Point the asset cache at
    # the fixture's, so the already converted folder is found (no second conversion).
    monkeypatch.setenv("AMCT_HF_CACHE", str(smollm2_dir.parent))
    monkeypatch.chdir(tmp_path)
    rc = main(["calibrate", "--num-samples", "2", "--seq-len", "64", "--batch-size", "2",
               "--no-progress"])
    assert rc == 0
    _check_record(read_kv_factors(tmp_path / "kv_cache.txt"), channels=1)  # library default
    assert "60 K/V entries (30 attention layers), 2 samples, 128 tokens" in capsys.readouterr().out
