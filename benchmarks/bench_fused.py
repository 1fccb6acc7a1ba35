"""The histogram count of one staged group on a device: fused kernel against torch operations.

What ``benchmarks/device_cost.py`` cannot count: how fast the fused count kernel
(``amct_hf/algorithms/fused.py``) really is, atomic contention included, when many values
of a table fall into few bins. One staged group at 8B geometry (32 entries side by side,
``--batches`` batches of 2048 tokens x 8 KV heads x 128 staged), counted into the tables a
streaming observer keeps -- per tensor (65536 bins per entry) or per channel (2048 per
channel), counts only (HFMG) or counts and offsets (IFMR) -- for three kinds of data:
``normal`` (Gaussian), ``heavy`` (Gaussian times a cubed uniform: most values near zero, a
long tail, like K/V states with outlier channels) and ``spiky`` (90% exact zeros: the
worst case for contention, every such value added to one bin).

Each row times the fused count and the torch operations alternately (``--repeat`` times
each, the fastest kept), checks both gave the same counts, and prints one JSON line: the
milliseconds of each, the values per second, and the fused kernel's read bandwidth of the
values. IFMR rows also time the exact extremes it keeps per batch (``torch.topk`` along the
tokens, largest and smallest), which the fused kernel does not replace. On CPU the fused
kernel runs in Triton's interpreter: ``--small`` is a smoke test, its times mean nothing.

    python benchmarks/bench_fused.py            # on a GPU: about half a minute
    python benchmarks/bench_fused.py --small    # CPU smoke test
"""
from __future__ import annotations

import argparse
import json
import time


def make_data(kind: str, rows: int, cols: int, dtype, device, seed: int = 0):
    import torch
    g = torch.Generator(device=device).manual_seed(seed)  # made where it is counted: no host copy
    x = torch.randn(rows, cols, generator=g, device=device)
    if kind == "heavy":
        x *= torch.rand(rows, cols, generator=g, device=device).pow(3) * 8
    elif kind == "spiky":
        x *= (torch.rand(rows, cols, generator=g, device=device) > 0.9).to(x.dtype)
    return x.to(dtype=dtype)


def main(argv=None) -> None:
    import torch

    from amct_hf.algorithms import fused, kernels
    from amct_hf.algorithms.aligned import AlignedHistogram

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--small", action="store_true", help="tiny sizes (CPU smoke test)")
    ap.add_argument("--entries", type=int, default=None, help="entries side by side (default 32; small: 2)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per batch (default 2048; small: 16)")
    ap.add_argument("--width", type=int, default=None, help="KV heads x head dim (default 1024; small: 8)")
    ap.add_argument("--batches", type=int, default=4, help="batches in the staged group")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--topk", type=int, default=None,
                    help="IFMR extremes kept (default: what 64 x 2048 tokens need, 151 per tensor, 64 per channel)")
    args = ap.parse_args(argv)
    if not fused.AVAILABLE:
        raise SystemExit("bench_fused: Triton is not importable here")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    entries = args.entries or (2 if args.small else 32)
    tokens = args.tokens or (16 if args.small else 2048)
    width = args.width or (8 if args.small else 1024)
    dtype = getattr(torch, args.dtype)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for per_channel in (False, True):
        rows, cols = (args.batches * tokens, entries * width) if per_channel else \
            (args.batches * tokens * width, entries)
        bins = 2048 if per_channel else 65536
        for with_offsets in (False, True):
            for kind in ("normal", "heavy", "spiky"):
                x = make_data(kind, rows, cols, dtype, device)
                lo, hi = torch.aminmax(x.float(), dim=0)
                times, tables = {}, {}
                with kernels.torch_path():
                    for rep in range(args.repeat):
                        for use_fused in (True, False):
                            with fused.fused_path(use_fused):
                                h = AlignedHistogram.empty(cols, bins, torch.device(device), with_offsets)
                                h.regrid(lo, hi)
                                sync()
                                start = time.perf_counter()
                                h.add_on_grid(x)
                                sync()
                                took = time.perf_counter() - start
                            times[use_fused] = min(times.get(use_fused, took), took)
                            tables[use_fused] = h.counts
                extremes_ms = None
                if with_offsets:  # IFMR also keeps exact extremes: torch.topk along the tokens, both ends
                    k = min(args.topk or (151 if not per_channel else 64), rows)
                    best = None
                    for _ in range(args.repeat):
                        sync()
                        start = time.perf_counter()
                        x.topk(k, 0)
                        x.topk(k, 0, largest=False)
                        sync()
                        took = time.perf_counter() - start
                        best = took if best is None else min(best, took)
                    extremes_ms = round(best * 1e3, 3)
                values = x.numel()
                print(json.dumps({
                    "device": device, "table": "per_channel" if per_channel else "per_tensor",
                    "algorithm": "ifmr (counts + offsets)" if with_offsets else "hfmg (counts)", "data": kind,
                    "values": values, "bins": bins, "rows": cols,
                    "fused_ms": round(times[True] * 1e3, 3), "torch_ms": round(times[False] * 1e3, 3),
                    "torch_over_fused": round(times[False] / times[True], 2), "extremes_topk_ms": extremes_ms,
                    "fused_gvalues_per_s": round(values / times[True] / 1e9, 2),
                    "fused_read_gbps": round(values * x.element_size() / times[True] / 1e9, 1),
                    "same_counts": bool(torch.equal(tables[True], tables[False]))}), flush=True)
                del x, tables


if __name__ == "__main__":
    main()
