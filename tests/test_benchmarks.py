"""benchmarks/bench_gpu.py --small runs on CPU and prints one JSON row per configuration,
target and decode cache (its full size needs a GPU: benchmarks/gpu_check.sh)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_gpu_small_prints_every_row():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--small", "--device", "cpu",
                          "--decode-steps", "2"], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    cal = [r for r in rows if r["kind"] == "calibration"]
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
