"""Which calibration settings hold on one model family: candidates for each target measured
with the arithmetic of the engine that serves them, with 95% intervals, and the measurements
that say why a target's settings cost what they cost (keys or values, which layers, clipping).

The calibration K/V states (the news corpus, packed as the driver packs it, BOS first where
the tokenizer adds one) are collected once for up to --cal-samples x --cal-len tokens; each
candidate's factors come from them through ``calibrate_kv_cache``'s own settings, observers
and margins (``accuracy_smollm2.factors_from_states``), from the first ``cal`` samples
(default 16). Each candidate is then evaluated on the two held-out corpora of
``accuracy_smollm2`` (Shakespeare, newsgroups), --eval-samples x --eval-len tokens each:

* ``int8``: the record's quantize-dequantize (what ``StaticInt8KVCache`` stores; with offsets
  0 also what vllm-ascend's scale-only C8 cache computes when no value offsets are folded,
  the ``ascend-c8`` target on a model without attention biases);
* ``fp8``: FP8 E4M3 with one scale per tensor, ``scale = clip amax / 448`` as
  ``export_vllm_fp8`` writes it (``amct_hf.export.vllm.fp8_kv_scale``), saturated as vLLM
  writes its cache.

    .venv/bin/python benchmarks/family_settings.py --model gemma3 [--select t0,t1] \
        [--diagnose] [--json out.json] [--table-only out.json]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

#: name -> (target it is a candidate for, arithmetic, calibrate_kv_cache keywords,
#: calibration samples it takes, label)
HFMG = {"act_algo": "hfmg", "quant_granularity": "per_tensor"}
IFMR = {"act_algo": "ifmr", "quant_granularity": "per_tensor"}


def _p(base, asym, **extra):
    return {**base, "asymmetric": asym, **extra}


def _kv(key, value=None, margin=0.0, groups=None, cal=16):
    kw = {"quant_algo_params": key, "value_quant_algo_params": value or key, "range_margin": margin}
    if groups:
        kw["channel_groups"] = groups
    return kw, cal


CANDIDATES = {
    # transformers: asymmetric INT8 record
    "t0": ("transformers", "int8", {"target": "transformers"}, 16, "target `transformers` as resolved for the model"),
    "g0": ("transformers", "int8", *_kv(_p(HFMG, True)),
           "HFMG per tensor asymmetric (the general `transformers` settings)"),
    "t1": ("transformers", "int8", *_kv(_p(HFMG, True), margin={"key": 0.25, "value": 0.25}),
           "HFMG per tensor asymmetric, ranges +25%"),
    "t2": ("transformers", "int8", *_kv(_p(HFMG, True), margin={"key": 0.5, "value": 0.5}),
           "HFMG per tensor asymmetric, ranges +50%"),
    "t3": ("transformers", "int8", *_kv(_p(HFMG, True), margin={"key": 1.0, "value": 1.0}),
           "HFMG per tensor asymmetric, ranges +100%"),
    "t4": ("transformers", "int8", *_kv(_p(IFMR, True)), "IFMR per tensor asymmetric"),
    "t5": ("transformers", "int8", *_kv(_p(HFMG, True, quant_granularity="per_channel"), _p(HFMG, True)),
           "HFMG asymmetric, keys per channel, values per tensor"),
    "t6": ("transformers", "int8", *_kv(_p(HFMG, True), cal=64), "HFMG per tensor asymmetric, 64 x 512 tokens"),
    "t7": ("transformers", "int8", *_kv(_p(HFMG, True), margin={"key": 0.5, "value": 0.0}),
           "HFMG per tensor asymmetric, key ranges +50%"),
    "t8": ("transformers", "int8", *_kv(_p(HFMG, True), margin={"key": 0.0, "value": 0.5}),
           "HFMG per tensor asymmetric, value ranges +50%"),
    "t9": ("transformers", "int8", *_kv(_p(HFMG, True, quant_granularity="per_channel")),
           "HFMG per channel asymmetric"),
    "t10": ("transformers", "int8", *_kv(_p(HFMG, True, quant_granularity="per_channel"), _p(HFMG, True),
                                         margin={"key": 0.1, "value": 0.0}),
            "HFMG asymmetric, keys per channel +10%, values per tensor"),
    # ascend-c8 without value centring: symmetric (scale-only) INT8
    "a0": ("ascend-c8", "int8", {"target": "ascend-c8"}, 16, "target `ascend-c8` as resolved for the model"),
    "a1": ("ascend-c8", "int8", *_kv(_p(HFMG, False)), "HFMG per tensor symmetric"),
    "a2": ("ascend-c8", "int8", *_kv(_p(HFMG, False), margin={"key": 0.25, "value": 0.25}),
           "HFMG per tensor symmetric, ranges +25%"),
    "a3": ("ascend-c8", "int8", *_kv(_p(HFMG, False), margin={"key": 0.5, "value": 0.5}),
           "HFMG per tensor symmetric, ranges +50%"),
    "a4": ("ascend-c8", "int8", *_kv(_p(HFMG, False), _p(HFMG, False, quant_granularity="per_channel"),
                                     margin={"key": 0.25, "value": 0.25}),
           "HFMG symmetric, keys per tensor, values per channel, ranges +25%"),
    "a5": ("ascend-c8", "int8", *_kv(_p(HFMG, False, quant_granularity="per_channel"),
                                     _p(HFMG, False, quant_granularity="per_channel"),
                                     margin={"key": 0.25, "value": 0.25}),
           "HFMG symmetric per channel, ranges +25%"),
    "a6": ("ascend-c8", "int8", *_kv(_p(IFMR, False)), "IFMR per tensor symmetric"),
    "a7": ("ascend-c8", "int8", *_kv(_p(HFMG, False, quant_granularity="per_channel"),
                                     _p(HFMG, False, quant_granularity="per_channel"),
                                     margin={"key": 0.0, "value": 0.25}),
           "HFMG symmetric per channel, value ranges +25%"),
    "a8": ("ascend-c8", "int8", *_kv(_p(HFMG, False, quant_granularity="per_channel"), _p(HFMG, False)),
           "HFMG symmetric, keys per channel, values per tensor"),
    # vllm-fp8: symmetric per tensor, E4M3
    "f0": ("vllm-fp8", "fp8", {"target": "vllm-fp8"}, 16, "target `vllm-fp8` as resolved for the model"),
    "f1": ("vllm-fp8", "fp8", *_kv(_p(HFMG, False), margin={"key": 1.0, "value": 1.0}),
           "HFMG per tensor symmetric, ranges +100%"),
    "f2": ("vllm-fp8", "fp8", *_kv(_p(HFMG, False), margin={"key": 2.0, "value": 2.0}),
           "HFMG per tensor symmetric, ranges +200%"),
    "f3": ("vllm-fp8", "fp8", *_kv(_p(HFMG, False), margin={"key": 4.0, "value": 4.0}),
           "HFMG per tensor symmetric, ranges +400%"),
    "f4": ("vllm-fp8", "fp8", *_kv(_p(IFMR, False), margin={"key": 0.5, "value": 0.5}),
           "IFMR per tensor symmetric, ranges +50%"),
    "f5": ("vllm-fp8", "fp8", *_kv(_p(HFMG, False)), "HFMG per tensor symmetric, as fitted"),
}


def cell(iv) -> str:
    return f"{iv['point']:+.2%} [{iv['low']:+.2%}, {iv['high']:+.2%}]"


class Transform:
    """kv_transform callback: ``fn(name, x) -> (x_hat, clipped)`` applied to the record keys
    ``only`` selects (all by default); counts clipped values per key."""

    def __init__(self, fn, only=None):
        self.fn, self.only = fn, only
        self.clipped: dict[str, list] = {}

    def __call__(self, name, states):
        if self.only is not None and not self.only(name):
            return states
        x = states.float()
        x_hat, clipped = self.fn(name, x)
        c = self.clipped.setdefault(name, [0, 0])
        c[0] += int(clipped.sum())
        c[1] += clipped.numel()
        return x_hat.to(states.dtype)


def int8_fn(factors):
    from amct_hf.algorithms.convention import fake_quantize
    from amct_hf.modeling.layout import broadcast_factor
    flat = {n: (torch.tensor(s, dtype=torch.float32), torch.tensor(o, dtype=torch.float32))
            for n, (s, o) in factors.items()}

    def run(name, x):
        s, o = flat[name]
        return fake_quantize(x, broadcast_factor(s, x, name), broadcast_factor(o, x, name), clipped=True)
    return run


def fp8_fn(factors):
    from amct_hf.evaluation.served import fp8_e4m3
    from amct_hf.export.vllm import fp8_kv_scale
    scales = {n: torch.tensor(fp8_kv_scale(s, o), dtype=torch.float32) for n, (s, o) in factors.items()}
    return lambda name, x: fp8_e4m3(x, scales[name])


def main():
    from accuracy import MODELS, load_model
    from accuracy_smollm2 import (
        add_size_args,
        add_table_args,
        collect_states,
        eval_corpora,
        factors_from_states,
        printed_saved_table,
    )

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(MODELS), default="gemma3")
    add_size_args(ap, eval_samples=16)
    ap.add_argument("--max-cal-samples", type=int, default=64, help="states collected (candidates take the first N)")
    ap.add_argument("--select", default=None, help="comma-separated candidate names (default: all)")
    ap.add_argument("--diagnose", action="store_true",
                    help="where the general transformers settings' cost comes from: keys or values, ranges against the "
                         "held-out text")
    ap.add_argument("--no-reference", action="store_true", help="skip FP8 with scale 1.0 (same chunks as before)")
    add_table_args(ap)
    args = ap.parse_args()
    if printed_saved_table(args, print_table):
        return


    from amct_hf.data.bundled import news_corpus_path
    from amct_hf.data.samples import load_texts, tokenize_samples
    from amct_hf.evaluation.perplexity import chunk_batches, chunk_interval, chunk_nll, evaluation_samples
    from amct_hf.evaluation.served import fp8_e4m3
    from amct_hf.modeling.attention import kv_transform
    from amct_hf.naming import layer_kind

    started = time.time()
    names = args.select.split(",") if args.select else list(CANDIDATES)
    model, tok = load_model(args.model)
    need = max([CANDIDATES[n][3] for n in names] + [args.cal_samples])
    need = min(need, args.max_cal_samples)
    cal = tokenize_samples(tok, load_texts(str(news_corpus_path())), seq_len=args.cal_len, num_samples=need)
    states = collect_states(model, cal)
    print(f"collected {len(cal)} x {args.cal_len} calibration tokens ({time.time() - started:.0f} s)", flush=True)

    corpora = {}
    for corpus, texts in eval_corpora(tok, args.eval_samples, args.eval_len).items():
        samples = evaluation_samples(tok, texts, args.eval_len, args.eval_samples, 0, False)
        batches = chunk_batches(samples, 1)
        with torch.no_grad():
            nll, count, chunks = chunk_nll(model, batches, "cpu", corpus, False)
        tokens = [int(b.shape[1]) - 1 for b in batches]
        corpora[corpus] = (batches, chunks, tokens, float(torch.tensor(nll / count).exp()))
    out = {"setup": vars(args), "fp32_ppl": {c: v[3] for c, v in corpora.items()}, "rows": [], "diagnosis": []}
    print(f"fp32 ({time.time() - started:.0f} s): " + ", ".join(f"{c} {v[3]:.3f}" for c, v in corpora.items()),
          flush=True)

    def save():
        out["seconds"] = time.time() - started
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)

    def measure(label, make, **extra):
        row = {"label": label, **extra}
        for corpus, (batches, base, tokens, _) in corpora.items():
            transform = make()
            with torch.no_grad(), kv_transform(model, transform):
                _, _, chunks = chunk_nll(model, batches, "cpu", label, False)
            clip = {n: c[0] / c[1] for n, c in transform.clipped.items()}
            row[corpus] = {"interval": chunk_interval(base, chunks, tokens), "clip_fraction": clip}
        out["rows" if "name" in extra else "diagnosis"].append(row)
        save()
        print(f"{extra.get('name', '-')}: {label}: "
              + ", ".join(f"{c} {cell(row[c]['interval'])}" for c in corpora)
              + f" ({time.time() - started:.0f} s)", flush=True)
        return row

    def factors_of(name):
        _, _, kwargs, n_cal, _ = CANDIDATES[name]
        subset = {k: v[:n_cal] for k, v in states.items()}
        return factors_from_states(model, subset, {**kwargs, "num_samples": n_cal, "seq_len": args.cal_len})

    if not args.no_reference:
        measure("FP8 E4M3, scale 1.0 (no calibration)",
                lambda: Transform(lambda n, x: fp8_e4m3(x, torch.ones(()))))
    if args.diagnose:
        factors = factors_of("g0")  # the general settings, whatever the family resolves to
        out["ranges"] = ranges_vs_eval(model, factors, corpora, kv_transform)
        for label, kind in (("keys only", "key"), ("values only", "value")):
            measure(f"general transformers settings, {label}",
                    lambda kind=kind: Transform(int8_fn(factors), lambda n: layer_kind(n) == kind))
    for name in names:
        target, arithmetic, _, _, label = CANDIDATES[name]
        factors = factors_of(name)
        fn = int8_fn if arithmetic == "int8" else fp8_fn
        measure(label, lambda: Transform(fn(factors)), name=name, target=target, arithmetic=arithmetic)
    print_table(out)


def ranges_vs_eval(model, factors, corpora, kv_transform) -> dict:
    """Per record key: the calibrated clip range [lo, hi] and the min / max the evaluation
    text reaches, to see whether calibration on news leaves the held-out text outside."""
    seen: dict = {}

    def watch(name, x):
        lo, hi = float(x.min()), float(x.max())
        a, b = seen.get(name, (lo, hi))
        seen[name] = (min(a, lo), max(b, hi))
        return x
    from amct_hf.evaluation.perplexity import chunk_nll
    out = {}
    for corpus, (batches, *_) in corpora.items():
        seen.clear()
        with torch.no_grad(), kv_transform(model, watch):
            chunk_nll(model, batches[:4], "cpu", corpus, False)
        for name, (lo, hi) in seen.items():
            s, o = factors[name]
            s, o = max(s), o[0] if len(o) == 1 else 0
            out.setdefault(name, {"calibrated": [(-128 - o) * s, (127 - o) * s]})[corpus] = [lo, hi]
    return out


def print_table(out) -> None:
    corpora = list(out["fp32_ppl"])
    print(f"\n| candidate | target | {' | '.join(corpora)} |")
    print("|---" * (len(corpora) + 2) + "|")
    print("| none (fp32 ppl) | - | " + " | ".join(f"{out['fp32_ppl'][c]:.3f}" for c in corpora) + " |")
    for row in out["diagnosis"] + out["rows"]:
        print(f"| {row['label']} | {row.get('target', '-')} | "
              + " | ".join(cell(row[c]["interval"]) for c in corpora) + " |")


if __name__ == "__main__":
    main()
