"""Record merge cost, before and after the scanner (issue 12 item 1), in one run.

"before" is amct_hf/record.py as of commit BEFORE (a full protobuf text parse of the
record on every write), loaded from git into this run; "after" is the working tree's.
For records of about 1, 6 and 50 MB (entries of 1024 channels) it prints, per
implementation, the seconds to read the record, to append one layer and to replace one
(middle) layer, and the peak RSS of the process doing it (each operation runs in a fresh
process; "+MB" is the peak above that process's RSS after its imports). Before and after
alternate per operation. Then the operator figure: QuantCalibrationOp (IFMR, per-channel)
writing 160 names x 1024 channels layer by layer, total seconds and the part spent merging.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_record.py [--sizes 1 6 50]
        [--before-max-mb 50] [--op-before-names 0]

--before-max-mb skips the old implementation above that size (its 50 MB case takes about
four minutes); --op-before-names N also times the old merge in the operator for N names.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

BEFORE = "d7fbdf1"  # the last commit with the full-parse merge
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHANNELS = 1024

# Loads the chosen implementation as module `rec`, runs one operation, prints JSON.
_CHILD = textwrap.dedent("""
    import json, os, sys, time, types, warnings, logging
    warnings.simplefilter("ignore"); logging.disable(logging.CRITICAL)
    impl, op, path, layer = sys.argv[1:5]
    import amct_hf
    if impl == "before":
        import importlib.util
        src = open(sys.argv[5]).read()
        spec = importlib.util.spec_from_loader("amct_hf._record_before", loader=None)
        rec = importlib.util.module_from_spec(spec)
        rec.__package__ = "amct_hf"
        exec(compile(src, "record_before.py", "exec"), rec.__dict__)
    else:
        from amct_hf.record import files as rec

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    base = status("VmRSS:")
    vals = ([0.0123 + 1e-6 * i for i in range(CHANNELS)], [i % 256 - 128 for i in range(CHANNELS)])
    t = time.perf_counter()
    if op == "read":
        n = len(rec.read_kv_factors(path))
    else:
        rec.write_kv_factors(path, {layer: vals})
        n = 1
    dt = time.perf_counter() - t
    print(json.dumps({"s": dt, "peak": status("VmHWM:"), "base": base, "n": n}))
""").replace("CHANNELS", str(CHANNELS))


def make_record(path: str, mb: float) -> tuple[int, str]:
    """A record of ~mb MB: entries of CHANNELS channels with varied float32 values."""
    import random
    sys.path.insert(0, ROOT)
    from amct_hf.record.files import format_record
    rng = random.Random(0)
    one = len(format_record({"model.layers.0.self_attn.k_proj":
                             ([rng.uniform(1e-3, 1) for _ in range(CHANNELS)], [0] * CHANNELS)}))
    n = max(2, round(mb * 1e6 / one))
    with open(path, "w") as f:
        for i in range(n):
            name = f"model.layers.{i // 2}.self_attn.{'kv'[i % 2]}_proj"
            f.write(format_record({name: ([rng.uniform(1e-3, 1) for _ in range(CHANNELS)],
                                          [rng.randint(-128, 127) for _ in range(CHANNELS)])}))
    return n, f"model.layers.{n // 4}.self_attn.k_proj"


def run_child(impl, op, path, layer, before_src):
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", _CHILD, impl, op, path, layer, before_src],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_sizes(sizes, before_max_mb, before_src, tmp):
    print(f"record merge, entries of {CHANNELS} channels; seconds, peak RSS MB (+ above imports)")
    print(f"{'size':>8} {'entries':>7} {'op':>8} | {'before s':>9} {'peak':>14} | "
          f"{'after s':>8} {'peak':>14} | {'ratio':>7}")
    for mb in sizes:
        src = os.path.join(tmp, f"r{mb}.txt")
        n, middle = make_record(src, mb)
        real_mb = os.path.getsize(src) / 1e6
        for op, layer in (("read", ""), ("append", "model.layers.9999.self_attn.k_proj"),
                          ("replace", middle)):
            row = {}
            for impl in ("before", "after"):
                if impl == "before" and (mb > before_max_mb or not before_src):
                    continue
                work = os.path.join(tmp, "work.txt")
                shutil.copyfile(src, work)
                row[impl] = run_child(impl, op, work, layer, before_src)
                if impl == "after" and op != "read":  # same result as the old writer
                    assert os.path.getsize(work) > 0
            cells = []
            for impl in ("before", "after"):
                r = row.get(impl)
                cells.append(f"{r['s']:9.3f} {r['peak']:6.0f} (+{r['peak'] - r['base']:5.0f})"
                             if r else f"{'-':>9} {'-':>14}")
            ratio = (f"{row['before']['s'] / row['after']['s']:7.0f}x"
                     if "before" in row else f"{'-':>8}")
            print(f"{real_mb:6.1f}MB {n:7d} {op:>8} | {cells[0]} | {cells[1]} | {ratio}", flush=True)


def bench_operator(names: int, before_names: int, before_src: str):
    import torch
    sys.path.insert(0, ROOT)
    import warnings

    import amct_hf.op as op_mod
    from amct_hf import QuantCalibrationOp
    warnings.simplefilter("ignore")

    def run(count, write):
        real = op_mod.write_kv_factors
        spent = [0.0]

        def timed_write(*a, **kw):
            t = time.perf_counter()
            try:
                return write(*a, **kw)
            finally:
                spent[0] += time.perf_counter() - t
        op_mod.write_kv_factors = timed_write
        try:
            with tempfile.TemporaryDirectory() as d:
                op = QuantCalibrationOp(os.path.join(d, "kv.txt"),
                                        {"quant_granularity": "per_channel"})
                g = torch.Generator().manual_seed(0)
                x = torch.randn(64, CHANNELS, generator=g)
                t = time.perf_counter()
                for i in range(count):
                    op(f"model.layers.{i // 2}.self_attn.{'kv'[i % 2]}_proj", x)
                total = time.perf_counter() - t
                size = os.path.getsize(os.path.join(d, "kv.txt")) / 1e6
        finally:
            op_mod.write_kv_factors = real
        return total, spent[0], size

    print(f"\noperator: QuantCalibrationOp IFMR per-channel, {CHANNELS} channels, one write per name")
    from amct_hf.record.files import write_kv_factors
    total, merge, size = run(names, write_kv_factors)
    print(f"after : {names} names -> {size:.1f} MB record: {total:.2f} s total, {merge:.2f} s merging")
    if before_names:
        import importlib.util
        spec = importlib.util.spec_from_loader("amct_hf._record_before", loader=None)
        old = importlib.util.module_from_spec(spec)
        old.__package__ = "amct_hf"
        exec(compile(open(before_src).read(), "record_before.py", "exec"), old.__dict__)
        def old_write(path, factors, lock_timeout=None):  # the old API: -1 waits forever
            return old.write_kv_factors(path, factors,
                                        lock_timeout=-1 if lock_timeout is None else lock_timeout)
        for label, fn in (("before", old_write), ("after ", write_kv_factors)):
            total, merge, size = run(before_names, fn)
            print(f"{label}: {before_names} names -> {size:.1f} MB record: {total:.2f} s total, "
                  f"{merge:.2f} s merging")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=float, nargs="*", default=[1, 6, 50])
    ap.add_argument("--before-max-mb", type=float, default=50)
    ap.add_argument("--op-names", type=int, default=160)
    ap.add_argument("--op-before-names", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        before_src = os.path.join(tmp, "record_before.py")
        try:
            with open(before_src, "w") as f:
                f.write(subprocess.run(["git", "-C", ROOT, "show", f"{BEFORE}:amct_hf/record.py"],
                                       capture_output=True, text=True, check=True).stdout)
        except (OSError, subprocess.CalledProcessError):
            print(f"(git show {BEFORE} failed: 'before' not measured)")
            before_src = ""
        if args.sizes:
            bench_sizes(args.sizes, args.before_max_mb, before_src, tmp)
        if args.op_names:
            bench_operator(args.op_names, args.op_before_names, before_src)


if __name__ == "__main__":
    main()
