"""The torch (accelerator) path against the compiled CPU kernels, on CPU, at 7B geometry.

One K and one V entry of a layer of Llama-2/3-7B/8B (8 KV heads x 128: a batch is
``[1, 8, 2048, 128]`` -> 2048 tokens x 1024 channels), random heavy-tailed values. Per
configuration (IFMR/HFMG x per-tensor/per-channel, streaming observers as the driver
uses them) and path (``numba``: the CPU kernels; ``torch``: the device code forced on CPU
with ``kernels.torch_path()``):

* ``update_s``: seconds per batch of one entry's observer update (mean over ``--batches``,
  after one warm-up batch);
* ``update_ops``: aten operations per update (a TorchDispatchMode count; the torch path
  is designed to keep this constant, independent of channels);
* ``solve_s``: seconds of the final solve of one entry.

This measures the CPU cost of the device code (its arithmetic, not an accelerator's
speed): a regression guard and the ratio to the kernels the CPU uses.

    .venv/bin/python benchmarks/bench_device_path.py [--batches 4] [--tokens 2048] [--channels 1024]

One JSON line per (configuration, path).
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from amct_hf.algorithms import kernels
from amct_hf.observers import make_observer
from amct_hf.settings.quant_params import parse_quant_algo_params

CONFIGS = [("ifmr", 0), ("ifmr", 1), ("hfmg", 0), ("hfmg", 1)]


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def batches(n, tokens, channels, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(1, channels, generator=g) * 3 + 0.1
    return [torch.randn(tokens, channels, generator=g) * scale
            * (1 + 20 * (torch.rand(tokens, 1, generator=g) > 0.999)) for _ in range(n)]


def run(algo, gran, path, xs):
    params = parse_quant_algo_params({"act_algo": algo, "quant_granularity": gran})
    shaped = [x if gran else x.reshape(-1, 1) for x in xs]
    with kernels.torch_path(path == "torch"):
        sized = {"expected_count": len(xs) * shaped[0].shape[0]} if algo == "ifmr" else {}
        obs = make_observer(params, "streaming", shaped[0].shape[1], **sized)
        obs.update(shaped[0])  # warm-up: first allocation, numba dispatch
        obs.hist  # noqa: B018 - the staged values are added when the statistics are read
        t0 = time.perf_counter()
        for x in shaped[1:]:
            obs.update(x)
        obs.hist  # noqa: B018
        update_s = (time.perf_counter() - t0) / max(1, len(shaped) - 1)
        with _Count() as count:
            obs.update(shaped[-1])
        t0 = time.perf_counter()
        obs.compute()
        solve_s = time.perf_counter() - t0
    return {"algo": algo, "granularity": "per_channel" if gran else "per_tensor", "path": path,
            "update_s": round(update_s, 4), "update_ops": count.n, "solve_s": round(solve_s, 3)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--channels", type=int, default=1024)
    ap.add_argument("--configs", default="all", help="comma list like ifmr:1,hfmg:0 (default: all four)")
    args = ap.parse_args(argv)
    configs = CONFIGS if args.configs == "all" else [
        (a, int(g)) for a, g in (c.split(":") for c in args.configs.split(","))]
    xs = batches(args.batches + 1, args.tokens, args.channels)
    paths = ["numba", "torch"] if kernels.AVAILABLE else ["torch"]
    for algo, gran in configs:
        rows = {path: run(algo, gran, path, xs) for path in paths}
        for row in rows.values():
            if "numba" in rows:
                row["update_vs_numba"] = round(row["update_s"] / rows["numba"]["update_s"], 2)
            row.update(tokens=args.tokens, channels=args.channels, threads=torch.get_num_threads())
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
