"""benchmarks/bench_gpu.py --small runs on CPU and prints one JSON row per configuration,
target and decode cache (its full size needs a GPU: benchmarks/gpu_check.sh)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_gpu_small_prints_every_row():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--small", "--device", "cpu",
                          "--decode-steps", "2"], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    cal = [r for r in rows if r["kind"] == "calibration"]
    warm = [r for r in rows if r["kind"] == "warm-up"]  # compiles apart from the timed rows
    assert len(warm) == 1 and warm[0]["rows"] == len(cal) and warm[0]["seconds"] > 0
    assert [r["row"] for r in cal] == ["ifmr per-tensor asym", "ifmr per-channel asym", "hfmg per-tensor asym",
                                       "hfmg per-channel asym", "target ascend-c8", "target transformers",
                                       "target vllm-fp8"]
    for r in cal:
        assert r["entries"] == 4 and r["calibrate_s"] > 0 and r["forward_s"] > 0
        assert r["ratio"] > 0
        assert r["stats_peak_gib"] is None  # no device memory counters on CPU
    dec = {r["cache"]: r for r in rows if r["kind"] == "decode"}
    assert set(dec) == {"dynamic", "int8"}
    # bf16 model: the int8 cache holds half the bytes
    assert dec["int8"]["cache_bytes"] * 2 == dec["dynamic"]["cache_bytes"] > 0


def test_bench_fused_small_counts_the_same_with_both_paths():
    """benchmarks/bench_fused.py --small (the fused kernel in Triton's interpreter): every
    table x algorithm x data row, each saying the fused and torch counts agreed."""
    pytest.importorskip("triton")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_fused.py"), "--small", "--device", "cpu",
                          "--repeat", "1"], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    kinds = ("normal", "heavy", "spiky")
    assert {(r["table"], r["algorithm"][:4], r["data"]) for r in rows} == {
        (t, a, d) for t in ("per_tensor", "per_channel") for a in ("hfmg", "ifmr") for d in kinds}
    assert all(r["same_counts"] and r["fused_ms"] > 0 and r["torch_ms"] > 0 for r in rows)


def test_accuracy_table_names_the_targets_over_the_goal(tmp_path):
    """benchmarks/accuracy.py --table-only: the table of a saved run, and every target cell
    over +0.15% named under it (and only those)."""
    def iv(point):
        return {"interval": {"point": point, "low": point - 0.001, "high": point + 0.001}}
    run = {"setup": {"model": "gemma3", "cal_samples": 2, "cal_len": 8, "eval_samples": 2, "eval_len": 8},
           "fp32_ppl": {"Shakespeare": 40.0, "newsgroups": 30.0},
           "references": {c: {"dynamic_per_token": iv(0.0004), "fp8_scale_1": iv(0.01)}
                          for c in ("Shakespeare", "newsgroups")},
           "rows": [{"target": "transformers", "served": "record", "Shakespeare": iv(0.001), "newsgroups": iv(0.0)},
                    {"target": "vllm-fp8", "served": "export", "Shakespeare": iv(0.0), "newsgroups": iv(0.0031)}]}
    (tmp_path / "run.json").write_text(json.dumps(run))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "accuracy.py"), "--table-only",
                          str(tmp_path / "run.json")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Gemma 3 270M fp32" in out.stdout
    assert "| target `vllm-fp8` (export) | +0.00% [-0.10%, +0.10%] | +0.31% [+0.21%, +0.41%] |" in out.stdout
    assert "| FP8 E4M3, scale 1.0 (no calibration) | +1.00% [+0.90%, +1.10%] |" in out.stdout
    over = [line for line in out.stdout.splitlines() if line.startswith("over +0.15%")]
    assert over == ["over +0.15%: vllm-fp8 on newsgroups: +0.31%"]


def test_device_cost_counts_a_batch_without_data_and_independently_of_the_layer_count():
    """benchmarks/device_cost.py on the meta device: a row per configuration and target, and
    the kernels of a batch the same for 2 and 4 layers (the entries are updated together)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rows = {}
    for layers in (2, 4):
        out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_cost.py"), "--layers", str(layers),
                              "--tokens", "256", "--batches", "2", "--warmup", "1", "--stage-mib", "64"],
                             capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
        assert out.returncode == 0, out.stderr[-3000:]
        rows[layers] = {r["config"]: r for r in map(json.loads, out.stdout.splitlines())}
    assert list(rows[2]) == ["ifmr/per_tensor", "ifmr/per_channel", "hfmg/per_tensor", "hfmg/per_channel",
                             "ascend-c8", "transformers", "vllm-fp8"]
    for config, row in rows[2].items():
        assert row["kernels_per_batch"] == rows[4][config]["kernels_per_batch"] > 0, config
        assert rows[4][config]["gbytes_per_batch"] > row["gbytes_per_batch"] > 0  # bytes follow the values


def test_family_settings_table_lists_diagnosis_then_candidates(tmp_path):
    """benchmarks/family_settings.py --table-only: the candidates table of a saved run, the
    diagnosis rows first, each candidate with the target it is for."""
    def iv(point):
        return {"interval": {"point": point, "low": point - 0.001, "high": point + 0.001}}
    run = {"fp32_ppl": {"Shakespeare": 40.0, "newsgroups": 30.0},
           "diagnosis": [{"label": "keys only", "Shakespeare": iv(0.007), "newsgroups": iv(0.009)}],
           "rows": [{"label": "per-channel keys", "name": "t5", "target": "transformers",
                     "Shakespeare": iv(0.0013), "newsgroups": iv(0.0038)}]}
    (tmp_path / "run.json").write_text(json.dumps(run))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "family_settings.py"), "--table-only",
                          str(tmp_path / "run.json")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert lines[1:] == ["| none (fp32 ppl) | - | 40.000 | 30.000 |",
                         "| keys only | - | +0.70% [+0.60%, +0.80%] | +0.90% [+0.80%, +1.00%] |",
                         "| per-channel keys | transformers | +0.13% [+0.03%, +0.23%] | +0.38% [+0.28%, +0.48%] |"]
