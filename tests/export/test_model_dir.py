"""The shard-streamed model directory copy: shard sizes, names, and memory (measured)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from amct_hf.errors import ExportError
from amct_hf.export.model_dir import parse_size

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("text,expected", [
    ("5GB", 5 * 10 ** 9), ("200MB", 200 * 10 ** 6), ("4GiB", 4 * 2 ** 30), ("1.5GB", 1500 * 10 ** 6),
    (" 512 kb ", 512000), (1234, 1234)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "5XB", "-1GB", "0", 0, "GB", True])
def test_parse_size_refuses(bad):
    with pytest.raises(ExportError, match="shard size"):
        parse_size(bad)


_MEASURE = textwrap.dedent("""
    import json, sys
    import psutil, torch, transformers, safetensors.torch  # the interpreter's baseline
    from amct_hf.export import export_ascend_c8

    def high_water_mark():
        # VmHWM: this process's peak RSS. Not getrusage's ru_maxrss, which Linux carries
        # over from the parent (pytest, with the model loaded) across fork + exec.
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))

    base = max(psutil.Process().memory_info().rss, high_water_mark())
    record, model, out = sys.argv[1:4]
    export_ascend_c8(record, model, out, max_shard_size="200MB")
    print(json.dumps({"baseline": base, "peak": high_water_mark()}))
""")


def test_two_shards_peak_rss_below_model_size(sym_record, smollm2_dir, tmp_path):
    """SmolLM2 fp32 (~540 MB) under a 200 MB cap: several shards, and the export's peak RSS
    above the interpreter's baseline (same subprocess, measured before the export) stays
    below the model's size: one shard at a time is in memory, not the model."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(sym_record), str(smollm2_dir), str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    model_size = os.path.getsize(smollm2_dir / "model.safetensors")
    used = figures["peak"] - figures["baseline"]
    print(f"\nmodel {model_size / 1e6:.0f} MB, baseline {figures['baseline'] / 1e6:.0f} MB, "
          f"peak {figures['peak'] / 1e6:.0f} MB, export used {used / 1e6:.0f} MB "
          f"({used / model_size:.2f} of the model)")
    assert used < model_size

    index = json.loads((out / "quant_model_weights.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards)
    assert n >= 2
    assert shards == [f"quant_model_weights-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    for shard in shards:  # no tensor of SmolLM2 exceeds the cap, so every shard fits in it
        assert os.path.getsize(out / shard) <= 200 * 10 ** 6 + 100_000  # + its JSON header
