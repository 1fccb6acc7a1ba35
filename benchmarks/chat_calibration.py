"""Plain vs chat-formatted calibration text, evaluated on plain and on chat-formatted text.

Calibrates the bundled SmolLM2-135M-Instruct twice with one target (default
``transformers``) on the bundled news corpus -- once plain, once rendered through its
chat template -- and evaluates both records on held-out Shakespeare (20-line passages)
and 20-newsgroups posts, each as plain packed text and rendered through the template.
Prints one row per (evaluation text, record) with the perplexity increase and its 95%
paired-bootstrap interval.

    .venv/bin/python benchmarks/chat_calibration.py --cal 16x512 --eval 16x512
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def _size(text: str) -> tuple[int, int]:
    n, _, length = text.partition("x")
    return int(n), int(length)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cal", default="16x512", help="calibration samples x tokens (default 16x512)")
    p.add_argument("--eval", default="16x512", help="evaluation chunks x tokens (default 16x512)")
    p.add_argument("--target", default="transformers")
    p.add_argument("--json", help="also write the rows as JSON here")
    p.add_argument("--records", nargs=2, metavar=("PLAIN", "CHAT"),
                   help="evaluate these two records instead of calibrating")
    p.add_argument("--only", nargs="+", metavar="CORPUS (FORMAT)",
                   help='evaluate only these, e.g. "newsgroups (chat)"')
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from amct_hf import calibrate_kv_cache
    from amct_hf.data.bundled import news_corpus_path, newsgroup_posts, shakespeare_texts, smollm2_folder
    from amct_hf.data.samples import load_texts
    from amct_hf.evaluation.perplexity import evaluate_kv_quant

    torch.manual_seed(0)
    folder = smollm2_folder()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    cal_n, cal_len = _size(args.cal)
    ev_n, ev_len = _size(args.eval)
    out = Path(tempfile.mkdtemp(prefix="chat_cal_"))
    records = dict(zip(("plain", "chat"), args.records or ()))
    for name, chat in (() if records else (("plain", False), ("chat", True))):
        res = calibrate_kv_cache(model, str(news_corpus_path()), tokenizer=tok, target=args.target,
                                 chat_template=chat, num_samples=cal_n, seq_len=cal_len,
                                 record_file=out / f"{name}.txt", progress=False)
        print(f"calibrated ({name}): {res.totals()}", file=sys.stderr)
        records[name] = res.record_file

    lines = load_texts(shakespeare_texts())
    passages = [" ".join(lines[i:i + 20]) for i in range(0, len(lines), 20)]
    corpora = {"shakespeare": passages, "newsgroups": newsgroup_posts()}
    rows = []
    for corpus, texts in corpora.items():
        for fmt, chat in (("plain", False), ("chat", True)):
            if args.only and f"{corpus} ({fmt})" not in args.only:
                continue
            base = None
            for rec_name, rec in records.items():
                r = evaluate_kv_quant(model, texts, rec, tokenizer=tok, num_samples=ev_n, seq_len=ev_len,
                                      references=False, baseline=base, chat_template=chat)
                base = base or r
                iv = r.interval
                rows.append({"eval": f"{corpus} ({fmt})", "calibration": rec_name,
                             "baseline_ppl": r.baseline_ppl, "ppl": r.quantized_ppl,
                             "relative_increase": r.relative_increase, "low": iv["low"], "high": iv["high"]})
                print(f"{corpus:12s} {fmt:6s} cal={rec_name:6s} base {r.baseline_ppl:9.4f} "
                      f"ppl {r.quantized_ppl:9.4f} {100 * r.relative_increase:+.3f}% "
                      f"[{100 * iv['low']:+.3f}%, {100 * iv['high']:+.3f}%]", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
