"""Record reads and merges: ``read_kv_factors`` and ``write_kv_factors`` against the naive
way, a full protobuf text parse and print of the record, in one run.

"naive" is implemented here with protobuf's ``text_format``: the whole record is parsed into
the AMCT message (``amct_hf.record.ScaleOffsetRecord``, the schema the package builds),
one entry is updated (or appended), and the whole record is printed back and replaced; a
read parses the whole record and takes every ``kv_cache_value``. "ours" is the package's
scanner and merge. For records of about 1, 6 and 50 MB (entries of 1024 channels) it prints,
per implementation, the seconds to read the record, to append one layer and to replace one
(middle) layer, and the peak RSS of the process doing it (each operation runs in a fresh
process; "+MB" is the peak above that process's RSS after its imports). The two alternate
per operation. Then the operator figure: ``QuantCalibrationOp`` (IFMR, per channel) writing
160 names x 1024 channels layer by layer, total seconds and the part spent merging.

    .venv/bin/python benchmarks/bench_record.py [--sizes 1 6 50] [--naive-max-mb 50] \\
        [--op-names 160] [--op-naive-names 0]

--naive-max-mb skips the naive merge above that size (its 50 MB case takes minutes);
--op-naive-names N also times the operator with the naive merge for N names, alternated
with ours.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time

from common import emit, proc_status_mb, run_worker

CHANNELS = 1024
IMPLS = ("naive", "ours")


def naive_read(path: str) -> dict:
    """Every ``kv_cache_value`` of the record, by a full protobuf parse."""
    from google.protobuf import text_format

    from amct_hf.record import ScaleOffsetRecord
    rec = ScaleOffsetRecord()
    with open(path, encoding="utf-8") as f:
        text_format.Parse(f.read(), rec, allow_unknown_field=True)
    return {e.key: (list(e.kv_cache_value.scale), list(e.kv_cache_value.offset))
            for e in rec.record if e.HasField("kv_cache_value")}


def naive_write(path: str, factors: dict, lock_timeout=None) -> None:
    """Merges ``factors`` the naive way: parse the whole record, update or append each
    entry, print the whole record, replace the file (no lock: one writer here)."""
    from google.protobuf import text_format

    from amct_hf.record import ScaleOffsetRecord
    rec = ScaleOffsetRecord()
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            text_format.Parse(f.read(), rec, allow_unknown_field=True)
    entries = {e.key: e for e in rec.record}
    for name, (scales, offsets) in factors.items():
        entry = entries.get(name) or rec.record.add(key=name)
        entry.kv_cache_value.Clear()
        entry.kv_cache_value.scale.extend(scales)
        entry.kv_cache_value.offset.extend(offsets)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text_format.MessageToString(rec, as_utf8=True))
    os.replace(tmp, path)


def worker(impl: str, op: str, path: str, layer: str) -> None:
    """One operation in this (fresh) process; prints seconds and memory as a JSON line."""
    import logging
    import warnings
    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)
    from amct_hf.record import read_kv_factors, write_kv_factors
    read, write = (naive_read, naive_write) if impl == "naive" else (read_kv_factors, write_kv_factors)
    base = proc_status_mb("VmRSS:")
    vals = ([0.0123 + 1e-6 * i for i in range(CHANNELS)], [i % 256 - 128 for i in range(CHANNELS)])
    start = time.perf_counter()
    if op == "read":
        n = len(read(path))
    else:
        write(path, {layer: vals})
        n = 1
    emit({"s": time.perf_counter() - start, "peak": proc_status_mb("VmHWM:"), "base": base, "n": n})


def make_record(path: str, mb: float) -> tuple[int, str]:
    """A record of ~mb MB: entries of CHANNELS channels with varied float32 values; returns
    the entry count and the name of a middle entry."""
    from amct_hf.record import format_record
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


def bench_sizes(sizes, naive_max_mb, tmp):
    from amct_hf.record import read_kv_factors
    print(f"record read and merge, entries of {CHANNELS} channels; seconds, peak RSS MB (+ above imports)")
    print(f"{'size':>8} {'entries':>7} {'op':>8} | {'naive s':>9} {'peak':>14} | "
          f"{'ours s':>8} {'peak':>14} | {'ratio':>7}")
    for mb in sizes:
        src = os.path.join(tmp, f"r{mb}.txt")
        n, middle = make_record(src, mb)
        real_mb = os.path.getsize(src) / 1e6
        for op, layer in (("read", ""), ("append", "model.layers.9999.self_attn.k_proj"),
                          ("replace", middle)):
            row, results = {}, {}
            for impl in IMPLS:
                if impl == "naive" and mb > naive_max_mb:
                    continue
                work = os.path.join(tmp, f"work-{impl}.txt")
                shutil.copyfile(src, work)
                row[impl] = run_worker([__file__, "--worker", impl, op, work, layer], what=f"{impl} {op}")
                if op != "read":
                    results[impl] = read_kv_factors(work)
            if len(results) == 2 and results["naive"] != results["ours"]:
                raise SystemExit(f"{op} on {real_mb:.1f} MB: the two merges hold different factors")
            cells = [f"{r['s']:9.3f} {r['peak']:6.0f} (+{r['peak'] - r['base']:5.0f})" if (r := row.get(impl))
                     else f"{'-':>9} {'-':>14}" for impl in IMPLS]
            ratio = f"{row['naive']['s'] / row['ours']['s']:7.0f}x" if "naive" in row else f"{'-':>8}"
            print(f"{real_mb:6.1f}MB {n:7d} {op:>8} | {cells[0]} | {cells[1]} | {ratio}", flush=True)


def bench_operator(names: int, naive_names: int):
    import warnings

    import torch

    import amct_hf.op as op_mod
    from amct_hf import QuantCalibrationOp
    from amct_hf.record import write_kv_factors
    warnings.simplefilter("ignore")

    def run(count, write):
        real = op_mod.write_kv_factors
        spent = [0.0]

        def timed_write(*a, **kw):
            start = time.perf_counter()
            try:
                return write(*a, **kw)
            finally:
                spent[0] += time.perf_counter() - start
        op_mod.write_kv_factors = timed_write
        try:
            with tempfile.TemporaryDirectory() as d:
                op = QuantCalibrationOp(os.path.join(d, "kv.txt"), {"quant_granularity": "per_channel"})
                x = torch.randn(64, CHANNELS, generator=torch.Generator().manual_seed(0))
                start = time.perf_counter()
                for i in range(count):
                    op(f"model.layers.{i // 2}.self_attn.{'kv'[i % 2]}_proj", x)
                total = time.perf_counter() - start
                size = os.path.getsize(os.path.join(d, "kv.txt")) / 1e6
        finally:
            op_mod.write_kv_factors = real
        return total, spent[0], size

    print(f"\noperator: QuantCalibrationOp IFMR per-channel, {CHANNELS} channels, one write per name")
    if names:
        total, merge, size = run(names, write_kv_factors)
        print(f"ours : {names} names -> {size:.1f} MB record: {total:.2f} s total, {merge:.2f} s merging")
    if naive_names:
        for label, fn in (("naive", naive_write), ("ours ", write_kv_factors)):
            total, merge, size = run(naive_names, fn)
            print(f"{label}: {naive_names} names -> {size:.1f} MB record: {total:.2f} s total, "
                  f"{merge:.2f} s merging", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=float, nargs="*", default=[1, 6, 50])
    ap.add_argument("--naive-max-mb", type=float, default=50)
    ap.add_argument("--op-names", type=int, default=160)
    ap.add_argument("--op-naive-names", type=int, default=0)
    ap.add_argument("--worker", nargs=4, metavar=("IMPL", "OP", "PATH", "LAYER"))
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker)
    with tempfile.TemporaryDirectory() as tmp:
        if args.sizes:
            bench_sizes(args.sizes, args.naive_max_mb, tmp)
        if args.op_names or args.op_naive_names:
            bench_operator(args.op_names, args.op_naive_names)


if __name__ == "__main__":
    main()
