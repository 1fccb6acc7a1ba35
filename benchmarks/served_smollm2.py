"""Accuracy as served: SmolLM2-135M (fp32) calibrated on the news corpus, exported, and
evaluated the way each engine reads the export (``evaluate_kv_quant(export_dir=...)``),
beside FP8 E4M3 with scale 1.0 (the engines' uncalibrated default) and dynamic per-token
INT8, on the accuracy benchmark's two held-out corpora.

The FP8 candidates pick the ``vllm-fp8`` target's settings: per-tensor symmetric HFMG and
IFMR ranges, as calibrated and widened (``range_margin``: scale x (1 + m)), exported with
``scale = clip amax / 448``. Results in docs/serving.md.

    python benchmarks/served_smollm2.py --json /tmp/served.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

#: label -> (calibration settings, range margin added afterwards)
FP8_CANDIDATES = {
    "hfmg": ("hfmg", 0.0),
    "hfmg +50%": ("hfmg", 0.5),
    "hfmg +100%": ("hfmg", 1.0),
    "ifmr": ("ifmr", 0.0),
    "ifmr +100%": ("ifmr", 1.0),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cal-samples", type=int, default=16)
    ap.add_argument("--cal-len", type=int, default=512)
    ap.add_argument("--eval-samples", type=int, default=8)
    ap.add_argument("--eval-len", type=int, default=512)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from accuracy_smollm2 import eval_corpora

    from amct_hf import calibrate_kv_cache, evaluate_kv_quant
    from amct_hf.calibrate import widen_ranges
    from amct_hf.data.bundled import load_smollm2, news_corpus_path, smollm2_folder
    from amct_hf.data.samples import load_texts
    from amct_hf.export.ascend import export_ascend_c8
    from amct_hf.export.vllm import export_vllm_fp8
    from amct_hf.record.files import write_kv_factors

    started = time.time()
    model_dir = str(smollm2_folder())
    model, tok = load_smollm2()
    news = load_texts(str(news_corpus_path()))
    corpora = eval_corpora(tok, args.eval_samples, args.eval_len)
    cal = dict(num_samples=args.cal_samples, seq_len=args.cal_len, progress=False, write=False, tokenizer=tok)
    ev = dict(num_samples=args.eval_samples, seq_len=args.eval_len, progress=False)
    work = tempfile.mkdtemp(prefix="served-")
    out = {"setup": {**vars(args), "model": "SmolLM2-135M-Instruct fp32", "calibration": "news"}, "rows": []}

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)

    try:
        records = {}
        for algo in ("hfmg", "ifmr"):
            res = calibrate_kv_cache(model, news, quant_algo_params={"act_algo": algo, "asymmetric": False,
                                                                     "quant_granularity": "per_tensor"}, **cal)
            records[algo] = res.factors
        res = calibrate_kv_cache(model, news, target="ascend-c8", **cal)
        records["ascend-c8"] = res.factors
        print(f"calibrated ({time.time() - started:.0f}s)", flush=True)

        exports = {}
        for label, (algo, margin) in FP8_CANDIDATES.items():
            rec = os.path.join(work, f"{len(exports)}.txt")
            write_kv_factors(rec, widen_ranges(records[algo], margin) if margin else records[algo])
            exports[label] = (rec, "vllm-fp8")
        rec = os.path.join(work, "ascend.txt")
        write_kv_factors(rec, records["ascend-c8"])
        exports["ascend-c8 target"] = (rec, "ascend-c8")

        for label, (rec, fmt) in exports.items():
            d = os.path.join(work, "export")
            (export_vllm_fp8 if fmt == "vllm-fp8" else export_ascend_c8)(rec, model_dir, d, overwrite=True)
            row = {"label": label, "format": fmt, "corpora": {}}
            for corpus, texts in corpora.items():
                base = out.get("_base", {}).get(corpus) if fmt == "vllm-fp8" else None
                r = evaluate_kv_quant(None, texts, export_dir=d, tokenizer=tok, references=base is None,
                                      baseline=base, **ev)
                if fmt == "vllm-fp8" and base is None:
                    out.setdefault("_base", {})[corpus] = r
                    out.setdefault("references", {})[corpus] = {
                        "baseline_ppl": r.baseline_ppl, **{k: v for k, v in r.references.items()}}
                row["corpora"][corpus] = {"ppl": r.quantized_ppl, "baseline_ppl": r.baseline_ppl,
                                          "relative_increase": r.relative_increase, "interval": r.interval}
                print(f"{label:18s} {corpus:12s} {100 * r.relative_increase:+.3f}% "
                      f"[{100 * r.interval['low']:+.3f}%, {100 * r.interval['high']:+.3f}%] "
                      f"({time.time() - started:.0f}s)", flush=True)
            out["rows"].append(row)
            base_free = {k: v for k, v in out.items() if k != "_base"}
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(base_free, f, indent=1)
        for corpus, refs in out["references"].items():
            for name in ("fp8_scale_1", "dynamic_per_token"):
                ref = refs[name]
                print(f"{name:18s} {corpus:12s} {100 * ref['relative_increase']:+.3f}% "
                      f"[{100 * ref['interval']['low']:+.3f}%, {100 * ref['interval']['high']:+.3f}%]")
        out.pop("_base", None)
        out["seconds"] = time.time() - started
        save()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
