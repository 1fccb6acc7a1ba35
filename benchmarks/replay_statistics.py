"""The per-channel statistics and solve alone, outside the forward: SmolLM2-135M's real K/V of
``--samples`` x 512 tokens are captured once, then replayed batch by batch, in the forward's
entry order, through the driver's bank (``KVBank``, streaming mode), as the hooks would feed it.

    .venv/bin/python benchmarks/replay_statistics.py [--samples 5] [--rounds 4] [--configs ...]

Printed per configuration, in ns per K/V value (the forward costs about 100 ns per value on
this machine kind), for each replay round of all samples: the whole update, and the update
with the compiled histogram kernel replaced by a no-op (staging copy, activation check,
ranges, grid: everything else). Round 1 includes allocating the statistics, round 2 their
first flush; later rounds are the steady state. Then the last flush and the solve of all 60
entries (seconds).
Every entry's histogram is evicted from the caches by the others' (60 x 5-8 MB), as in the
forward.
"""
from __future__ import annotations

import argparse
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--configs", default="ifmr/per_channel,hfmg/per_channel")
    args = ap.parse_args()

    import torch
    from bench_calibration import setup

    from amct_hf.algorithms import kernels
    from amct_hf.distributed import Comm
    from amct_hf.modeling.attention import KVCalibrationHooks
    from amct_hf.naming import record_order
    from amct_hf.observers.kv import KVBank
    from amct_hf.settings.quant_params import parse_quant_algo_params

    model, _, _, batches = setup(args.samples, 512)
    captured: list[tuple[str, torch.Tensor]] = []
    with torch.no_grad(), KVCalibrationHooks(model, lambda name, x: captured.append((name, x.clone()))):
        for batch in batches:
            model(input_ids=batch["input_ids"], use_cache=False, logits_to_keep=1)
    values = sum(x.numel() for _, x in captured)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    del model
    real_update = kernels.aligned_update_columns

    def make_bank(algo, gran):
        params = parse_quant_algo_params({"act_algo": algo, "quant_granularity": gran})
        return KVBank({"key": params, "value": params}, "streaming", {"key": "channel", "value": "channel"},
                      head_dim=head_dim)

    def replay(bank):
        per_round = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            for name, x in captured:
                bank(name, x)
            per_round.append((time.perf_counter() - start) / values * 1e9)
        return per_round

    print(f"SmolLM2-135M K/V of {args.samples} x 512 tokens ({values / 1e6:.1f} M values per round), "
          f"{torch.get_num_threads()} threads")
    for config in args.configs.split(","):
        algo, gran = config.split("/")
        replay(make_bank(algo, gran))  # compiles, warms the allocator
        whole = make_bank(algo, gran)
        full = replay(whole)
        kernels.aligned_update_columns = lambda *a, **k: None
        try:
            rest = replay(make_bank(algo, gran))
        finally:
            kernels.aligned_update_columns = real_update
        start = time.perf_counter()
        whole.finalize_all(Comm(), order=record_order)
        solve = time.perf_counter() - start
        print(f"{config}: update {' / '.join(f'{v:.2f}' for v in full)} ns per value by round; "
              f"without the histogram kernel {' / '.join(f'{v:.2f}' for v in rest)}; last flush + solve {solve:.2f} s")


if __name__ == "__main__":
    main()
