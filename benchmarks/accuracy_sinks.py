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
import contextlib
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_smollm2 import add_size_args, collect_states, eval_corpora, factors_from_states  # noqa: E402

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
    add_size_args(ap)
    ap.add_argument("--oracle", action="store_true", help="also: sink tokens of the evaluation left unquantized")
    args = ap.parse_args()
    from amct_hf import evaluate_kv_quant
    from amct_hf.data.bundled import load_smollm2, news_corpus_path
    from amct_hf.data.samples import load_texts, tokenize_samples
    from amct_hf.naming import layer_kind

    model, tok = load_smollm2()
    n, length = args.eval_samples, args.eval_len
    corpora = eval_corpora(tok, n, length)
    news = load_texts(str(news_corpus_path()))
    states = collect_states(model, tokenize_samples(tok, news, seq_len=args.cal_len, num_samples=args.cal_samples))
    # every stored batch is one packed sample: row 0 is its first token
    sinks = {name: (torch.stack([b[0] for b in batches]).amin(0), torch.stack([b[0] for b in batches]).amax(0))
             for name, batches in states.items()}
    baselines: dict = {}
    full_precision: dict = {}  # corpus -> the oracle's full-precision (NLL, tokens)
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
        if args.oracle:
            for kinds in (("key", "value"), ("key",), ("value",)):
                cells = []
                for corpus, texts in corpora.items():
                    chunks = tokenize_samples(tok, texts, seq_len=length, num_samples=n)
                    if corpus not in full_precision:
                        full_precision[corpus] = summed_nll(model, chunks)
                    quantized = summed_nll(model, chunks, sink_kept_transform(factors, kinds))
                    increase = math.exp((quantized[0] - full_precision[corpus][0]) / quantized[1]) - 1
                    cells.append(f"{corpus} {increase:+.3%}")
                print(f"{label}, evaluation sinks' {'/'.join(kinds)} unquantized: " + ", ".join(cells), flush=True)


def sink_kept_transform(factors, kinds):
    """kv_transform callback: the record applied to every K/V except the first position of
    each chunk for ``kinds``."""
    from amct_hf.algorithms.convention import fake_quantize
    from amct_hf.naming import layer_kind

    def transform(name, states):  # states [B, kv_heads, S, head_dim]
        scales, offsets = (torch.as_tensor(v, dtype=torch.float32) for v in factors[name])
        shape = (1, states.shape[1], 1, states.shape[3]) if scales.numel() > 1 else (1, 1, 1, 1)
        out = fake_quantize(states.float(), scales.reshape(shape), offsets.reshape(shape)).to(states.dtype)
        if layer_kind(name) in kinds:
            out[..., :1, :] = states[..., :1, :]
        return out
    return transform


def summed_nll(model, chunks, transform=None):
    """(summed next-token NLL, predicted tokens) over the chunks, one per batch, as
    evaluate_kv_quant scores them."""
    from amct_hf.modeling.attention import kv_transform
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in chunks:
            ids = torch.tensor([chunk])
            with kv_transform(model, transform) if transform is not None else contextlib.nullcontext():
                logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            total += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
            count += ids.shape[1] - 1
    return total, count


if __name__ == "__main__":
    main()
