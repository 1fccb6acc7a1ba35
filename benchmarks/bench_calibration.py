"""calibrate_kv_cache on the real SmolLM2-135M and a real corpus, against a plain forward
loop over the same batches, measured in the same run; and peak resident memory for N
and 8*N calibration tokens (each measurement in a fresh process).

    .venv/bin/python benchmarks/bench_calibration.py [--samples 64] [--seq-len 512] \
        [--mem-samples 4] [--mem-seq-len 512] [--device cpu|cuda] [--repeats 3] \
        [--configs ifmr/per_channel,...] [--no-memory] [--interleave batch|run]

"forward" is the first baseline: ``model(input_ids)`` over the same batches, logits
included. Calibration computes logits for the last position only (it reads K/V, not
logits), so a second baseline, the same forward with ``logits_to_keep=1``, is printed too:
the ratio to it is what the statistics and the solve cost.

Calibration has a fixed cost per layer (the solve at the end: about 1 s for per-channel
IFMR and HFMG over SmolLM2's 60 K/V entries on 2 CPU cores) on top of the per-batch
statistics, so the ratio is measured on a calibration-sized run.

``--interleave batch`` (default): every batch of each calibration is preceded, in a forward
pre-hook, by the ``logits_to_keep=1`` forward over the same tokens on an unhooked copy of
the model; the calibration's time is its wall time less those forwards (so it keeps the
tokenising, the statistics and the solve). This machine's speed drifts by 10-20% over
minutes, which alternating whole runs cannot cancel; over one batch (about a second) it
barely moves. "ratio to it (sums)" is over all ``--repeats`` calibrations.
``--interleave run``: whole forward loops and calibrations alternate ``--repeats`` times;
"ratio to it" is the fastest calibration over the fastest forward, "median pair ratio" the
median of each calibration over the forward just before it.
The forward with logits is timed once, before the first calibration. ``BENCH_TRACE=FILE``
appends every measurement as a JSON line (per batch where interleaved).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from common import CONFIGS, compile_kernels, emit, peak_rss_mb, plain_forward, run_worker, smollm2_setup


def worker(kind, algo, gran, samples, seq_len):
    """One measurement in this process; prints a JSON line."""
    from amct_hf import calibrate_kv_cache
    model, tok, texts, batches = smollm2_setup(samples, seq_len)
    plain_forward(model, batches[:1])  # warm-up (allocator, kernels)
    out = {"kind": kind, "algo": algo, "granularity": gran, "samples": samples, "seq_len": seq_len}
    params = {"act_algo": algo, "quant_granularity": gran}
    compile_kernels(model, texts, tok, params)
    rss_before = peak_rss_mb()

    def calibrate():
        calibrate_kv_cache(model, texts, tokenizer=tok, quant_algo_params=params, num_samples=samples,
                           seq_len=seq_len, progress=False, write=False)

    if kind == "time":
        start = time.perf_counter()
        plain_forward(model, batches)  # the forward with logits: context, timed once
        out["forward_s"] = time.perf_counter() - start
        repeats = int(os.environ.get("BENCH_REPEATS", "3"))
        interleave = batch_interleaved if os.environ.get("BENCH_INTERLEAVE", "batch") == "batch" \
            else alternated_runs
        out.update(interleave(model, batches, calibrate, repeats))
    else:
        start = time.perf_counter()
        calibrate()
        out["calibrate_s"] = time.perf_counter() - start
    out["peak_rss_mb"] = peak_rss_mb()
    out["rss_before_calibration_mb"] = rss_before
    emit(out)


def alternated_runs(model, batches, calibrate, repeats):
    """Whole ``logits_to_keep=1`` forward loops and calibrations alternated: the fastest of
    each, and the ratio of each calibration to the forward just before it (drift between
    pairs cancels; drift within a pair, over a minute here, does not)."""
    no_logits_s, calibrate_s = [], []
    for _ in range(repeats):
        # calibration spares the LM head (logits_to_keep=1): the same forward without
        # logits shows what the statistics themselves cost
        start = time.perf_counter()
        plain_forward(model, batches, logits_to_keep=1)
        no_logits_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        calibrate()
        calibrate_s.append(time.perf_counter() - start)
    return {"forward_no_logits_s": min(no_logits_s), "forward_no_logits_all_s": no_logits_s,
            "calibrate_s": min(calibrate_s), "calibrate_all_s": calibrate_s,
            "pair_ratios": [c / f for c, f in zip(calibrate_s, no_logits_s)]}


def batch_interleaved(model, batches, calibrate, repeats):
    """Calibrations whose every batch is preceded by the baseline forward over the same
    tokens, on an unhooked copy of the model: drift on this machine takes minutes, a batch
    a second. The baseline's time is taken out of the calibration's wall time, which keeps
    everything else it does (tokenising, the statistics, the solve)."""
    import copy

    import torch
    baseline = copy.deepcopy(model)  # made before any hooks: the observers never see it
    spent, marks = [], []

    def before_batch(module, args, kwargs):
        start = time.perf_counter()
        marks.append(start)
        with torch.no_grad():
            baseline(input_ids=kwargs["input_ids"], use_cache=False, logits_to_keep=1)
        if kwargs["input_ids"].device.type == "cuda":
            torch.cuda.synchronize()
        spent.append(time.perf_counter() - start)

    handle = model.register_forward_pre_hook(before_batch, with_kwargs=True)
    forward_s, calibrate_s, per_batch = [], [], []
    try:
        for _ in range(repeats):
            spent.clear()
            marks.clear()
            start = time.perf_counter()
            calibrate()
            end = time.perf_counter()
            forward_s.append(sum(spent))
            calibrate_s.append(end - start - sum(spent))
            # per batch: the baseline forward, then the calibration's share up to the next
            # batch (the first includes the setup before it, the last the solve after it)
            edges = [start] + marks[1:] + [end]
            per_batch.append([(f, edges[i + 1] - edges[i] - f) for i, f in enumerate(spent)])
    finally:
        handle.remove()
    return {"interleaved_forward_s": forward_s, "interleaved_calibrate_s": calibrate_s,
            "interleaved_per_batch_s": per_batch,
            "interleaved_ratios": [c / f for c, f in zip(calibrate_s, forward_s)],
            "interleaved_ratio_of_sums": sum(calibrate_s) / sum(forward_s)}


def run(kind, algo, gran, samples, seq_len):
    out = run_worker([__file__, "--worker", kind, algo, gran, samples, seq_len],
                     what=f"{kind} {algo}/{gran}")
    if os.environ.get("BENCH_TRACE"):  # every measurement, per batch where interleaved
        with open(os.environ["BENCH_TRACE"], "a") as trace:
            trace.write(json.dumps(out) + "\n")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=64, help="timing: samples of --seq-len tokens")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--mem-samples", type=int, default=4, help="memory: N samples (and 8 N)")
    ap.add_argument("--mem-seq-len", type=int, default=512)
    ap.add_argument("--device", default=os.environ.get("BENCH_DEVICE", "cpu"), help="cpu, cuda or cuda:N")
    ap.add_argument("--repeats", type=int, default=int(os.environ.get("BENCH_REPEATS", "3")),
                    help="forward/calibration pairs per configuration")
    ap.add_argument("--configs", default="all", help="comma list like ifmr/per_channel, or all")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-RSS runs")
    ap.add_argument("--interleave", choices=("batch", "run"), default=os.environ.get("BENCH_INTERLEAVE", "batch"),
                    help="batch: the baseline forward before every calibration batch; run: whole forward "
                         "loops and calibrations alternated")
    ap.add_argument("--worker", nargs=5)
    args = ap.parse_args()
    os.environ["BENCH_DEVICE"] = args.device
    os.environ["BENCH_REPEATS"] = str(args.repeats)
    os.environ["BENCH_INTERLEAVE"] = args.interleave
    if args.worker:
        kind, algo, gran, samples, seq_len = args.worker
        return worker(kind, algo, gran, int(samples), int(seq_len))
    n, seq = args.samples, args.seq_len
    mn, mseq = args.mem_samples, args.mem_seq_len
    print(f"SmolLM2-135M fp32, news corpus; time: {n} x {seq} tokens; peak RSS: {mn} x {mseq} (N) "
          f"and {8 * mn} x {mseq} (8N) tokens")
    batch = args.interleave == "batch"
    if batch:
        print(f"{args.repeats} calibrations per configuration, each batch preceded by the logits_to_keep=1 "
              "forward over its tokens on an unhooked copy of the model")
        print("| algorithm | granularity | forward (s) | forward, no logits (s) | calibrate (s) | ratio to it "
              "(sums) | ratio per calibration | peak RSS N (MB) | peak RSS 8N (MB) | 8N / N |")
        print("|---|---|---|---|---|---|---|---|---|---|")
    else:
        print(f"{args.repeats} forward/calibration pairs per configuration")
        print("| algorithm | granularity | forward (s) | calibrate (s) | ratio | forward, no logits (s) | "
              "ratio to it | median pair ratio (all pairs) | peak RSS N (MB) | peak RSS 8N (MB) | 8N / N |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
    configs = CONFIGS if args.configs == "all" else [tuple(c.split("/")) for c in args.configs.split(",")]
    for algo, gran in configs:
        t = run("time", algo, gran, n, seq)
        memory = "| - | - | - |"
        if not args.no_memory:
            m1 = run("memory", algo, gran, mn, mseq)
            m8 = run("memory", algo, gran, 8 * mn, mseq)
            memory = (f"| {m1['peak_rss_mb']:.0f} | {m8['peak_rss_mb']:.0f} | "
                      f"{m8['peak_rss_mb'] / m1['peak_rss_mb']:.3f} |")
        if batch:
            fw, cal = t["interleaved_forward_s"], t["interleaved_calibrate_s"]
            print(f"| {algo} | {gran} | {t['forward_s']:.2f} | {' / '.join(f'{x:.2f}' for x in fw)} | "
                  f"{' / '.join(f'{x:.2f}' for x in cal)} | {t['interleaved_ratio_of_sums']:.3f} | "
                  f"{', '.join(f'{r:.3f}' for r in t['interleaved_ratios'])} {memory}", flush=True)
            continue
        pairs = t["pair_ratios"]
        print(f"| {algo} | {gran} | {t['forward_s']:.2f} | {t['calibrate_s']:.2f} | "
              f"{t['calibrate_s'] / t['forward_s']:.3f} | {t['forward_no_logits_s']:.2f} | "
              f"{t['calibrate_s'] / t['forward_no_logits_s']:.3f} | {statistics.median(pairs):.3f} "
              f"({', '.join(f'{r:.3f}' for r in pairs)}) {memory}", flush=True)


if __name__ == "__main__":
    main()
