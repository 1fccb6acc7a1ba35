"""Does a record calibrated on short samples hold at long positions? SmolLM2-135M (fp32,
``target="transformers"``) calibrated on the news corpus at two sample lengths with the
same token budget (default 16 x 512 vs 4 x 2048), both evaluated on the same long chunks of
Shakespeare (default 8 x 2048 tokens, excerpts from the middle of evenly spaced plays),
perplexity increase over fp32 with 95% paired-bootstrap intervals over the chunks, beside
dynamic per-token INT8 and the min-max oracle fitted on the evaluation text itself.

    .venv/bin/python benchmarks/long_context.py [--lengths 512,2048] [--budget 8192] \
        [--eval-samples 8] [--eval-len 2048] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="512,2048", help="calibration sample lengths (tokens)")
    ap.add_argument("--budget", type=int, default=8192, help="calibration tokens per length")
    ap.add_argument("--eval-samples", type=int, default=8)
    ap.add_argument("--eval-len", type=int, default=2048)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from accuracy_smollm2 import shakespeare_excerpts

    from amct_hf import calibrate_kv_cache, evaluate_kv_quant
    from amct_hf.data.bundled import load_smollm2, news_corpus_path
    from amct_hf.data.samples import load_texts

    started = time.time()
    model, tok = load_smollm2()
    news = load_texts(str(news_corpus_path()))
    texts = shakespeare_excerpts(tok, args.eval_samples, args.eval_len, chars=4 * args.eval_len)
    ev = dict(tokenizer=tok, num_samples=args.eval_samples, seq_len=args.eval_len, progress=False)
    out = {"setup": vars(args), "rows": []}
    baseline = None
    for length in (int(n) for n in args.lengths.split(",")):
        t = time.time()
        samples = max(1, args.budget // length)
        res = calibrate_kv_cache(model, news, tokenizer=tok, target="transformers", num_samples=samples,
                                 seq_len=length, progress=False, write=False)
        if res.shortfall:
            raise SystemExit(f"calibration at {length} tokens fell short: {res.shortfall}")
        r = evaluate_kv_quant(model, texts, res.factors, references=baseline is None, baseline=baseline, **ev)
        if baseline is None:
            baseline = r
            out["fp32_ppl"], out["num_tokens"], out["references"] = r.baseline_ppl, r.num_tokens, r.references
        row = {"cal": f"{samples} x {length}", "ppl": r.quantized_ppl, "interval": r.interval,
               "seconds": time.time() - t}
        out["rows"].append(row)
        iv = row["interval"]
        print(f"calibrated on {row['cal']}: {iv['point']:+.3%} [{iv['low']:+.3%}, {iv['high']:+.3%}] "
              f"({row['seconds']:.0f} s)", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)

    def cell(iv):
        return f"{iv['point']:+.2%} [{iv['low']:+.2%}, {iv['high']:+.2%}]"
    print(f"\nSmolLM2-135M fp32, target transformers; evaluation: Shakespeare, {args.eval_samples} x "
          f"{args.eval_len} tokens (fp32 ppl {out['fp32_ppl']:.3f}); {time.time() - started:.0f} s\n")
    print("| K/V quantization | ppl increase over fp32 [95% interval] |\n|---|---|")
    for row in out["rows"]:
        print(f"| static, calibrated on news {row['cal']} tokens | {cell(row['interval'])} |")
    for key, label in (("dynamic_per_token", "dynamic per-token INT8 (no calibration)"),
                       ("minmax", "min-max oracle (fit on the evaluation text)")):
        print(f"| {label} | {cell(out['references'][key]['interval'])} |")


if __name__ == "__main__":
    main()
