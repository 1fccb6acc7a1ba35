"""Attention-sink protection, measured (issue 14): does widening each calibrated range until
the first token of every calibration sample (the attention sink of a packed chunk) is not
clipped lower the perplexity cost?

Same model, corpora, chunks and intervals as ``accuracy_smollm2.py`` (its helpers are
reused). For each configuration the script prints how many K/V entries clip a sink at all
(and by how much the widest must grow), then the perplexity increase with and without the
protection.

    .venv/bin/python benchmarks/accuracy_sinks.py [--eval-samples 32]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_smollm2 import collect_states, factors_from_states, shakespeare_excerpts, spread_texts  # noqa: E402

CONFIGS = [("target ascend-c8", {"target": "ascend-c8"}),
           ("target vllm-fp8", {"target": "vllm-fp8"})]


def clip_bounds(scales, offsets):
    s = torch.tensor(scales, dtype=torch.float32)
    o = torch.tensor(offsets, dtype=torch.float32)
    return s * (-128 - o), s * (127 - o)


def growth_to_cover(scales, offsets, lo, hi):
    """Per-channel factor (>= 1) the scales need so [lo, hi] is inside the clip range (the
    offset kept, so the range grows about zero); one factor for a per-tensor entry."""
    low, high = clip_bounds(scales, offsets)
    grow = torch.maximum((hi / high).clamp_min(1), (lo / low).clamp_min(1))
    return grow.max().reshape(1) if len(scales) == 1 else grow


def protect(factors, sinks):
    out = {}
    for name, (scales, offsets) in factors.items():
        grow = growth_to_cover(scales, offsets, *sinks[name])
        out[name] = ([float(v) for v in torch.tensor(scales, dtype=torch.float32) * grow], list(offsets))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cal-samples", type=int, default=16)
    ap.add_argument("--cal-len", type=int, default=512)
    ap.add_argument("--eval-samples", type=int, default=32)
    ap.add_argument("--eval-len", type=int, default=512)
    args = ap.parse_args()
    from amct_hf import evaluate_kv_quant
    from amct_hf.assets import load_smollm2, news_corpus_path, newsgroup_posts
    from amct_hf.data import load_texts, tokenize_samples
    from amct_hf.naming import layer_kind

    model, tok = load_smollm2()
    n, length = args.eval_samples, args.eval_len
    corpora = {"Shakespeare": shakespeare_excerpts(tok, n, length),
               "newsgroups": spread_texts(tok, [p[:4000] for p in newsgroup_posts()], n, length)}
    news = load_texts(str(news_corpus_path()))
    states = collect_states(model, tokenize_samples(tok, news, seq_len=args.cal_len, num_samples=args.cal_samples))
    # every stored batch is one packed sample: row 0 is its first token
    sinks = {name: (torch.stack([b[0] for b in batches]).amin(0), torch.stack([b[0] for b in batches]).amax(0))
             for name, batches in states.items()}
    baselines: dict = {}
    ev = dict(tokenizer=tok, num_samples=n, seq_len=length, progress=False)
    for label, kwargs in CONFIGS:
        factors = factors_from_states(model, states, kwargs)
        for kind in ("key", "value"):
            grows = [float(growth_to_cover(s, o, *sinks[k]).max()) for k, (s, o) in factors.items()
                     if layer_kind(k) == kind]
            print(f"{label}: {kind} entries clipping a sink: {sum(g > 1 for g in grows)} of {len(grows)}, "
                  f"widest growth needed x{max(grows):.2f}")
        for suffix, chosen in (("", factors), (" + sink protection", protect(factors, sinks))):
            started, cells = time.time(), []
            for corpus, texts in corpora.items():
                first = corpus not in baselines
                r = evaluate_kv_quant(model, texts, chosen, references=first,
                                      baseline=baselines.get(corpus), **ev)
                baselines.setdefault(corpus, r)
                iv = r.interval
                cells.append(f"{corpus} {iv['point']:+.3%} [{iv['low']:+.3%}, {iv['high']:+.3%}]")
            print(f"{label}{suffix}: " + ", ".join(cells) + f" ({time.time() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
