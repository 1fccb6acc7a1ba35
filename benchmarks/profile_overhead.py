"""Where calibration's overhead goes: the same batches through SmolLM2-135M, in one process,
interleaved, with the hooks feeding sinks of increasing cost:

- ``forward``: ``model(input_ids, logits_to_keep=1)``, no hooks (the baseline);
- ``hooks``: routed attention, a sink that does nothing;
- ``check``: the sink runs :func:`~amct_hf.observers.base.check_activation` only;
- ``bank``: the driver's :class:`~amct_hf.observers.kv.KVBank` (statistics, no solve),
  forwards stopping as in ``stop`` (as the driver runs them);
- ``stop``: the sink does nothing and each forward stops once the last layer's K/V are
  observed (``stop_when_complete``, as the driver runs);
- ``solve``: the bank's reduce + algorithm after the last batch (measured once per config).

    .venv/bin/python benchmarks/profile_overhead.py [--samples 16] [--seq-len 512] [--repeats 3]

Every figure is the fastest of ``--repeats`` passes; the columns are seconds and the ratio
of each to ``forward``.
"""
from __future__ import annotations

import argparse
import time

CONFIGS = [("ifmr", "per_tensor"), ("ifmr", "per_channel"), ("hfmg", "per_tensor"), ("hfmg", "per_channel")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--configs", default="all", help="comma list like ifmr/per_tensor, or all")
    args = ap.parse_args()

    import torch
    from bench_calibration import plain_forward, setup

    from amct_hf.distributed import Comm
    from amct_hf.modeling.attention import KVCalibrationHooks, KVStatesComplete
    from amct_hf.naming import record_order
    from amct_hf.observers.base import check_activation
    from amct_hf.observers.kv import KVBank
    from amct_hf.settings.quant_params import parse_quant_algo_params

    model, _, _, batches = setup(args.samples, args.seq_len)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    configs = CONFIGS if args.configs == "all" else [tuple(c.split("/")) for c in args.configs.split(",")]

    def run(sink, stop=False):
        start = time.perf_counter()
        if sink is None:
            plain_forward(model, batches, logits_to_keep=1)
        elif not stop:
            with KVCalibrationHooks(model, sink):
                plain_forward(model, batches, logits_to_keep=1)
        else:
            with torch.no_grad(), KVCalibrationHooks(model, sink, stop_when_complete=True):
                for batch in batches:
                    try:
                        model(input_ids=batch["input_ids"], use_cache=False, logits_to_keep=1)
                    except KVStatesComplete:
                        pass
        return time.perf_counter() - start

    def make_bank(algo, gran):
        params = parse_quant_algo_params({"act_algo": algo, "quant_granularity": gran})
        return KVBank({"key": params, "value": params}, "streaming", {"key": "channel", "value": "channel"},
                      head_dim=head_dim)

    noop = lambda name, x: None
    checking = lambda name, x: check_activation(name, x)
    # warm-up: allocator, numba compilation of every kernel the configs use
    run(None)
    for algo, gran in configs:
        bank = make_bank(algo, gran)
        with torch.no_grad(), KVCalibrationHooks(model, bank):
            model(input_ids=batches[0]["input_ids"][:, :16], use_cache=False, logits_to_keep=1)
        bank.finalize_all(Comm(), order=record_order)

    rows = {name: [] for name in ("forward", "hooks", "stop", "check")}
    banks = {f"{a}/{g}": [] for a, g in configs}
    solves = {}
    for _ in range(args.repeats):
        rows["forward"].append(run(None))
        rows["hooks"].append(run(noop))
        rows["stop"].append(run(noop, stop=True))
        rows["check"].append(run(checking))
        for algo, gran in configs:
            bank = make_bank(algo, gran)
            banks[f"{algo}/{gran}"].append(run(bank, stop=True))
            start = time.perf_counter()
            bank.finalize_all(Comm(), order=record_order)
            solves.setdefault(f"{algo}/{gran}", []).append(time.perf_counter() - start)
    base = min(rows["forward"])
    tokens = args.samples * args.seq_len
    print(f"SmolLM2-135M fp32, {args.samples} x {args.seq_len} tokens, {torch.get_num_threads()} threads, "
          f"fastest of {args.repeats}")
    print("| pass | seconds | / forward |")
    print("|---|---|---|")
    for name, values in list(rows.items()) + list(banks.items()):
        print(f"| {name} | {min(values):.3f} | {min(values) / base:.3f} |")
    for name, values in solves.items():
        print(f"| {name} solve | {min(values):.3f} | {min(values) / base:.3f} |")
    print(f"({tokens} tokens; forward {1e6 * base / tokens:.1f} us per token)")


if __name__ == "__main__":
    main()
