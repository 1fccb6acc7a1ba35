"""What the statistics cost a device per calibration batch, counted at full model geometry
without a device: the driver's sink run on the ``meta`` device.

A ``meta`` tensor has a shape and no data, so the sink (``KVBank`` exactly as the driver
builds it: deferred NaN/Inf checks, entries grouped and staged) runs its whole per-batch
path at the real geometry in milliseconds, on the torch (accelerator) path. A
``TorchDispatchMode`` counts, per batch:

* ``kernels``: aten operations that run a kernel on a device (views excluded);
* ``gbytes``: bytes read and written by them (every tensor argument and result, a
  scatter's table entries as many as it adds; an upper bound: a fused or cached read costs
  less);
* ``scattered``: elements added by ``scatter_add`` or the fused kernels (histogram
  counting: atomics on a GPU);
* ``host_reads``: any read of a value by the host would fail on ``meta``, so a run that
  completes has none in its per-batch path (the flags' read-back every
  ``DeferredChecks.check_every`` entries is switched off here and costs one copy).

``--forward-ms`` (default: the ``logits_to_keep=1`` forward of a Llama-3-8B-geometry
model, bf16, batch 1 x 2048 tokens, measured on an H200: 3.96 s for 64 batches) and two
device figures turn the counts into an estimate of the calibration / forward ratio:
``--kernel-us`` per kernel (the floor of a small kernel's launch-to-finish time) and
``--tbps`` of memory bandwidth reached by these streaming kernels (default 3.0, about 60%
of the H200's 4.8 TB/s peak). Atomic contention in ``scatter_add`` is not modelled: it
is what a device run has to show.

    .venv/bin/python benchmarks/device_cost.py [--layers 32] [--kv-heads 8] [--head-dim 128] \\
        [--tokens 2048] [--batches 8] [--dtype bfloat16] [--solve]

``--path fused`` (the default, what a CUDA device with Triton runs) counts each fused
kernel of :mod:`amct_hf.algorithms.fused` as one operation reading its batch once; ``--path
torch`` the torch operations that replace them elsewhere (an NPU, or no Triton).

One JSON line per configuration and target; with ``--solve``, one more per configuration
for the final solve (its kernels, host reads and bytes, scaled to the model, and its share
of a run of ``--total-batches`` forwards).
"""
from __future__ import annotations

import argparse
import json
import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from amct_hf.algorithms import fused
from amct_hf.observers import base
from amct_hf.observers.kv import KVBank
from amct_hf.observers.streaming import IFMR_SOLVE_ROWS, SOLVE_ROWS
from amct_hf.settings.presets import resolve_kv_settings
from amct_hf.settings.quant_params import parse_quant_algo_params

CONFIGS = [("ifmr", 0), ("ifmr", 1), ("hfmg", 0), ("hfmg", 1)]
#: ops that read table entries by index (their bytes: the entries read, not the table)
LOOKUPS = {"gather", "index", "take", "index_select", "searchsorted"}
#: ops that only reserve memory (no traffic)
ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
#: ops that make the host wait for the device
HOST_READS = {"_local_scalar_dense", "item", "nonzero", "equal", "masked_select"}
TARGETS = ("ascend-c8", "transformers", "vllm-fp8")


class Cost(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.kernels = 0
        self.bytes = 0
        self.scattered = 0
        self.host_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name.split("::")[-1]
        if not func.is_view and name not in ALLOCATIONS:
            self.kernels += 1
            if name == "count_on_grid":
                # one read of each value; each adds to one entry of the counts (and offsets)
                x, tables = args[0], [t for t in args[4:6] if t.numel()]
                self.scattered += x.numel() * len(tables)
                self.bytes += _distinct(x) * x.element_size() + sum(
                    2 * min(t.numel(), x.numel()) * t.element_size() for t in tables)
                self.bytes += sum(t.numel() * t.element_size() for t in args[1:4])
                return out
            if name == "move_rows":
                # every row counted as moved (an upper bound: a row whose grid stays is not
                # touched, which meta tensors cannot tell)
                tables = [t for t in args[:2] if t.numel()]
                self.scattered += sum(t.numel() for t in tables)
                self.bytes += sum(3 * t.numel() * t.element_size() for t in tables)
                self.bytes += sum(t.numel() * t.element_size() for t in args[2:])
                return out
            if name in ("scatter_add_", "scatter_add"):
                table, _, index, src = args[:4]
                self.scattered += index.numel()
                # a scatter reads and writes the table entries it hits only, not the whole table
                touched = min(table.numel(), index.numel())
                self.bytes += (2 * touched * table.element_size() + _distinct(index) * index.element_size()
                               + _distinct(src) * src.element_size())
                return out
            outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor)]
            # an out= argument is the result: counted once, as written
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)
                       and not any(a is o for o in outs)]
            if name in LOOKUPS:
                # a lookup reads about as many table entries as it writes, not the whole table
                tensors = tensors[1:] + outs + outs
            else:
                tensors += outs
            self.bytes += sum(_distinct(t) * t.element_size() for t in tensors)
            if name in HOST_READS:
                self.host_reads += 1
        return out


def _distinct(t: torch.Tensor) -> int:
    """Elements a kernel really touches: an expanded (stride 0) dimension is read once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        n *= size if stride else 1
    return n


def _label(config) -> str:
    return config if isinstance(config, str) else f"{config[0]}/{('per_tensor', 'per_channel')[config[1]]}"


def settings(config):
    if isinstance(config, str):
        kv = resolve_kv_settings(config)
        return kv.params, kv.groups
    algo, gran = config
    p = parse_quant_algo_params({"act_algo": algo, "quant_granularity": gran})
    return {"key": p, "value": p}, {"key": "channel", "value": "channel"}


def run(config, args) -> dict:
    with fused.fused_path(args.path == "fused"):
        return _run(config, args)


def _run(config, args) -> dict:
    # the sink refuses meta tensors (no data to calibrate on); here they stand for device ones
    base.check_activation = lambda *a, **k: None
    params, groups = settings(config)
    width = args.kv_heads * args.head_dim
    bank = KVBank(params, "streaming", groups, head_dim=args.head_dim,
                  tokens=args.tokens * args.total_batches, defer_checks=True)
    bank.checks.check_every = 1 << 62
    if args.stage_mib:
        for kind_bank in bank.banks.values():
            kind_bank.stacks.stage_bytes = args.stage_mib << 20
    names = [f"model.layers.{i}.self_attn.{k}_proj" for i in range(args.layers) for k in "kv"]
    dtype = getattr(torch, args.dtype)
    # the states as the attention hands them over (made outside the count: not our work)
    states = [torch.empty(args.tokens, width, dtype=dtype, device="meta") for _ in names]

    def feed():
        for name, x in zip(names, states):
            bank(name, x)

    with torch.no_grad():
        # not counted: the first groups create the observers' tables
        for _ in range(args.warmup):
            feed()
        bank.flush()
        with Cost() as cost:
            for _ in range(args.batches):
                feed()
            bank.flush()
    kernels = cost.kernels / args.batches
    gbytes = cost.bytes / args.batches / 1e9
    scattered = cost.scattered / args.batches
    ms = kernels * args.kernel_us / 1e3 + gbytes / args.tbps
    return {"config": _label(config), "path": args.path if fused.AVAILABLE else "torch (no Triton)",
            "layers": args.layers, "tokens": args.tokens, "dtype": args.dtype,
            "kernels_per_batch": round(kernels, 1), "gbytes_per_batch": round(gbytes, 2),
            "scattered_per_batch": int(scattered), "estimated_ms_per_batch": round(ms, 2),
            "forward_ms": args.forward_ms, "estimated_ratio": round(1 + ms / args.forward_ms, 3)}


def solve(config, args) -> dict:
    with fused.fused_path(args.path == "fused"):
        return _solve(config, args)


def _solve(config, args) -> dict:
    """The final solve, measured on CPU tensors with the torch path forced (a solve reads
    values back, which meta tensors cannot): one entry per kind with random heavy-tailed
    values (2 batches), then scaled to the model: the entries of a kind are solved
    together up to a number of rows (their kernels and reads grow with the number of such
    groups, their bytes with the entries)."""
    from amct_hf.algorithms import kernels
    from amct_hf.distributed import Comm
    params, groups = settings(config)
    width = args.kv_heads * args.head_dim
    bank = KVBank(params, "streaming", groups, head_dim=args.head_dim, tokens=2 * args.tokens, defer_checks=True)
    g = torch.Generator().manual_seed(0)
    scale = torch.rand(1, width, generator=g) * 3 + 0.1
    with kernels.torch_path(), torch.no_grad():
        for _ in range(2):
            for name in ("model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"):
                x = torch.randn(args.tokens, width, generator=g) * scale
                bank(name, x * (1 + 20 * (torch.rand(args.tokens, 1, generator=g) > 0.999)))
        bank.check_pending()
        with Cost() as cost:
            bank.finalize_all(Comm())
    # entries of a kind are solved together up to a row limit: solves per kind, averaged
    limits = {"ifmr": IFMR_SOLVE_ROWS, "hfmg": SOLVE_ROWS}
    repeat = sum(math.ceil(args.layers * (width if p.per_channel else 1) / limits[p.act_algo])
                 for p in params.values()) / 2
    kernels_model, reads_model = cost.kernels * repeat, cost.host_reads * repeat
    gbytes_model = cost.bytes * args.layers / 1e9
    ms = kernels_model * args.kernel_us / 1e3 + reads_model * args.read_us / 1e3 + gbytes_model / args.tbps
    run_ms = args.forward_ms * args.total_batches
    return {"config": _label(config), "solve": True, "path": args.path if fused.AVAILABLE else "torch (no Triton)",
            "kernels_one_layer": cost.kernels,
            "host_reads_one_layer": cost.host_reads, "gbytes_one_layer": round(cost.bytes / 1e9, 3),
            "model_kernels": int(kernels_model), "model_host_reads": int(reads_model),
            "model_gbytes": round(gbytes_model, 2), "estimated_ms": round(ms, 1),
            "share_of_the_run": round(ms / run_ms, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per batch")
    ap.add_argument("--warmup", type=int, default=2, help="batches fed before counting")
    ap.add_argument("--batches", type=int, default=8, help="batches counted (staging spans several)")
    ap.add_argument("--total-batches", type=int, default=64, help="batches of the whole run (sizes IFMR's extremes)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--stage-mib", type=int, default=0, help="staging limit per bank (default: the library's)")
    ap.add_argument("--forward-ms", type=float, default=3960 / 64)
    ap.add_argument("--kernel-us", type=float, default=3.0)
    ap.add_argument("--tbps", type=float, default=3.0)
    ap.add_argument("--read-us", type=float, default=20.0, help="a host read's round trip")
    ap.add_argument("--path", choices=["fused", "torch"], default="fused",
                    help="the device kernels counted: fused (CUDA with Triton) or torch operations")
    ap.add_argument("--solve", action="store_true", help="also the final solve (minutes on CPU)")
    args = ap.parse_args()
    for config in [*CONFIGS, *TARGETS]:
        print(json.dumps(run(config, args)), flush=True)
    if args.solve:
        for config in CONFIGS:
            print(json.dumps(solve(config, args)), flush=True)


if __name__ == "__main__":
    main()
