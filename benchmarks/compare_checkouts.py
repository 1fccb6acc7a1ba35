"""Calibration time of this checkout against another one (e.g. before a refactor), measured
in the same run: worker processes alternate between the two source trees, each timing the
``logits_to_keep=1`` forward and ``calibrate_kv_cache`` in the four configurations on
SmolLM2-135M; the table shows each side's fastest calibration over its own fastest forward.

    git worktree add /tmp/before <commit>
    .venv/bin/python benchmarks/compare_checkouts.py --other /tmp/before [--samples 32] [--rounds 2]

The other tree must have ``calibrate_kv_cache`` with the same arguments.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from common import CONFIGS, compile_kernels, emit, plain_forward, run_worker, smollm2_setup

HERE = Path(__file__).resolve().parents[1]


def worker(samples, seq_len):
    import amct_hf  # this tree's benchmark helpers, either tree's amct_hf
    from amct_hf import calibrate_kv_cache
    model, tok, texts, batches = smollm2_setup(samples, seq_len)

    def forward():
        plain_forward(model, batches, logits_to_keep=1)

    out = {"source": str(Path(amct_hf.__file__).parent), "forward_s": [], "calibrate_s": {}}
    forward()  # warm-up
    for algo, gran in CONFIGS:
        compile_kernels(model, texts, tok, {"act_algo": algo, "quant_granularity": gran})
    for algo, gran in CONFIGS:
        start = time.perf_counter()
        forward()
        out["forward_s"].append(time.perf_counter() - start)
        start = time.perf_counter()
        calibrate_kv_cache(model, texts, tokenizer=tok, quant_algo_params={"act_algo": algo, "quant_granularity": gran},
                           num_samples=samples, seq_len=seq_len, progress=False, write=False)
        out["calibrate_s"][f"{algo}/{gran}"] = time.perf_counter() - start
    emit(out)


def run(source: Path, samples: int, seq_len: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(source)}
    return run_worker([__file__, "--worker", samples, seq_len], env=env, cwd=str(source), what=str(source))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--other", help="root of the other source tree (the one holding amct_hf/)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--worker", nargs=2, type=int)
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker)
    sides = {"this": HERE, "other": Path(args.other).resolve()}
    results = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, source in sides.items():
            results[name].append(run(source, args.samples, args.seq_len))
    print(f"SmolLM2-135M fp32, {args.samples} x {args.seq_len} tokens, {args.rounds} rounds alternated; "
          f"this = {HERE}, other = {sides['other']}")
    print("| configuration | this: calibrate / forward | other: calibrate / forward | this / other |")
    print("|---|---|---|---|")
    for algo, gran in CONFIGS:
        key = f"{algo}/{gran}"
        ratio = {}
        for name, runs in results.items():
            forward = min(min(r["forward_s"]) for r in runs)
            ratio[name] = min(r["calibrate_s"][key] for r in runs) / forward
        print(f"| {key} | {ratio['this']:.3f} | {ratio['other']:.3f} | {ratio['this'] / ratio['other']:.3f} |")


if __name__ == "__main__":
    main()
