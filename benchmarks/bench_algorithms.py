"""IFMR and HFMG: the fast paths against the one-channel-at-a-time reference, same run.

Cases: per-tensor on a [16, 1024, 1024] float32 tensor and per-channel on a
[65536, 256] tensor. The reference is timed on every channel where that takes a few
seconds; for per-channel HFMG it is timed on a subset of channels and scaled to 256
(printed as such). Factors of the fast path are compared with the reference on every
channel the reference ran on.

    .venv/bin/python benchmarks/bench_algorithms.py [--ref-channels 8] [--threads 2]
"""
from __future__ import annotations

import argparse
import time

import torch

from amct_hf.algorithms.hfmg import HistogramState, hfmg_factors
from amct_hf.algorithms.ifmr import ifmr_factors
from amct_hf.algorithms.reference import reference_hfmg, reference_ifmr_channel


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def fast_ifmr(x2d):
    return ifmr_factors(x2d)


def fast_hfmg(x2d):
    return hfmg_factors(HistogramState.from_batch(x2d, 4096))


def ref_ifmr(x2d, channels):
    out = [reference_ifmr_channel(x2d[:, j].contiguous())[:2] for j in channels]
    return [s for s, _ in out], [o for _, o in out]


def ref_hfmg(x2d, channels):
    return reference_hfmg([x2d[:, list(channels)]], per_channel=True, num_of_bins=4096)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref-channels", type=int, default=8,
                    help="channels the per-channel HFMG reference runs on (scaled to 256)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import numba
        numba.set_num_threads(args.threads)
    except ImportError:
        pass
    torch.manual_seed(0)
    per_tensor = torch.randn(16, 1024, 1024) * 1.3 + 0.2
    per_channel = torch.randn(65536, 256) * torch.rand(256) * 3 + torch.randn(256) * 0.3
    # warm up the compiled kernels (their one-off compile time is not part of a calibration)
    fast_ifmr(per_channel[:512, :4])
    fast_hfmg(per_channel[:512, :4])

    cases = [
        ("IFMR", "per-tensor [16,1024,1024]", per_tensor.reshape(-1, 1), fast_ifmr, ref_ifmr, None),
        ("IFMR", "per-channel [65536,256]", per_channel, fast_ifmr, ref_ifmr, None),
        ("HFMG", "per-tensor [16,1024,1024]", per_tensor.reshape(-1, 1), fast_hfmg, ref_hfmg, None),
        ("HFMG", "per-channel [65536,256]", per_channel, fast_hfmg, ref_hfmg, args.ref_channels),
    ]
    rows = []
    for algo, name, x, fast, ref, subset in cases:
        (scales, offsets), t_fast = timed(lambda: fast(x))
        channels = range(x.shape[1]) if subset is None else range(subset)
        (ref_s, ref_o), t_ref = timed(lambda: ref(x, channels))
        scaled = t_ref * x.shape[1] / len(channels)
        same = all(abs(float(scales[j]) - ref_s[i]) <= 1e-6 * abs(ref_s[i]) and int(offsets[j]) == ref_o[i]
                   for i, j in enumerate(channels))
        note = "" if subset is None else f" (measured on {len(channels)} ch, x{x.shape[1] // len(channels)})"
        rows.append((algo, name, t_fast, scaled, scaled / t_fast, same, note))
        print(f"{algo} {name}: fast {t_fast:.3f} s, reference {scaled:.2f} s{note}, "
              f"ratio {scaled / t_fast:.0f}x, factors identical: {same}", flush=True)
    print()
    print("| algorithm | case | fast (s) | reference (s) | reference / fast | factors identical |")
    print("|---|---|---|---|---|---|")
    for algo, name, tf, tr, ratio, same, note in rows:
        print(f"| {algo} | {name} | {tf:.3f} | {tr:.2f}{note} | {ratio:.0f}x | {same} |")


if __name__ == "__main__":
    main()
