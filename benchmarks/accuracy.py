"""Every target as its engine serves it, on a real model, with 95% intervals: one command
per table (``--model smollm2`` or ``--model gemma3``).

Calibration: the news corpus (gensim's lee_background), --cal-samples x --cal-len tokens,
through ``calibrate_kv_cache(target=...)``. Evaluation: the accuracy benchmark's two held-out
corpora (``accuracy_smollm2.eval_corpora``: Shakespeare excerpts and 20-newsgroups posts),
--eval-samples x --eval-len tokens each. Each cell is the perplexity increase over fp32 on
the same chunks with a 95% paired-bootstrap interval over the chunks:

* ``transformers``: the record as transformers' quantized cache applies it
  (``evaluate_kv_quant(record)``: asymmetric INT8, quantize-dequantize after RoPE);
* ``ascend-c8``: the ``export_ascend_c8`` directory as vllm-ascend serves it
  (``evaluate_kv_quant(export_dir=...)``: exported weights with any folded value biases,
  scale-only symmetric INT8 with the exported scales);
* ``vllm-fp8``: the ``export_vllm_fp8`` directory as vLLM serves it (FP8 E4M3 with the
  exported per-tensor scales);
* references: dynamic per-token INT8 and FP8 E4M3 with scale 1.0 (vLLM's uncalibrated
  default), both from the ``vllm-fp8`` evaluation.

    .venv/bin/python benchmarks/accuracy.py --model gemma3 [--cal-samples 16] [--cal-len 512] \
        [--eval-samples 16] [--eval-len 512] [--json out.json] [--table-only out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

MODELS = {"smollm2": "SmolLM2-135M-Instruct", "gemma3": "Gemma 3 270M"}
TARGETS = ("transformers", "ascend-c8", "vllm-fp8")
REFERENCES = {"dynamic_per_token": "dynamic per-token INT8 (no calibration)",
              "fp8_scale_1": "FP8 E4M3, scale 1.0 (no calibration)"}
GOAL = 0.0015  # the project's accuracy goal: at most +0.15% perplexity per target


def model_folder(name: str) -> str:
    from amct_hf.data.bundled import gemma3_folder, smollm2_folder
    return str({"smollm2": smollm2_folder, "gemma3": gemma3_folder}[name]())


def cell(iv) -> str:
    return f"{iv['point']:+.2%} [{iv['low']:+.2%}, {iv['high']:+.2%}]"


def print_table(out) -> None:
    setup, corpora = out["setup"], list(out["fp32_ppl"])
    print(f"\n{MODELS[setup['model']]} fp32; calibration: news, {setup['cal_samples']} x {setup['cal_len']} "
          f"tokens; evaluation: {setup['eval_samples']} x {setup['eval_len']} tokens per corpus; ppl increase "
          f"over fp32 [95% paired bootstrap interval over chunks]; {out.get('seconds', 0):.0f} s")
    print(f"\n| K/V cache | {' | '.join(corpora)} |")
    print("|---" * (len(corpora) + 1) + "|")
    print("| none (fp32 ppl) | " + " | ".join(f"{out['fp32_ppl'][c]:.3f}" for c in corpora) + " |")
    for key, label in REFERENCES.items():
        print(f"| {label} | " + " | ".join(cell(out["references"][c][key]["interval"]) for c in corpora) + " |")
    for row in out["rows"]:
        print(f"| target `{row['target']}` ({row['served']}) | "
              + " | ".join(cell(row[c]["interval"]) for c in corpora) + " |")
    over = [(row["target"], c, row[c]["interval"]["point"]) for row in out["rows"] for c in corpora
            if row[c]["interval"]["point"] > GOAL]
    for target, corpus, point in over:
        print(f"over +0.15%: {target} on {corpus}: {point:+.2%}")


def load_model(name: str):
    """(fp32 model in eval mode, tokenizer) of a bundled model, from its folder, offline."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = model_folder(name)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(folder, local_files_only=True)


def main():
    from accuracy_smollm2 import add_size_args, add_table_args, printed_saved_table

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    add_size_args(ap, eval_samples=16)
    add_table_args(ap)
    args = ap.parse_args()
    if printed_saved_table(args, print_table):
        return

    from accuracy_smollm2 import eval_corpora

    from amct_hf import calibrate_kv_cache, evaluate_kv_quant
    from amct_hf.data.bundled import news_corpus_path
    from amct_hf.data.samples import load_texts
    from amct_hf.export import export_ascend_c8, export_vllm_fp8

    started = time.time()
    folder = model_folder(args.model)  # the exports copy the model's own files
    model, tok = load_model(args.model)
    news = load_texts(str(news_corpus_path()))
    corpora = eval_corpora(tok, args.eval_samples, args.eval_len)
    ev = dict(num_samples=args.eval_samples, seq_len=args.eval_len, progress=False)
    out = {"setup": vars(args), "fp32_ppl": {}, "references": {}, "rows": []}
    work = tempfile.mkdtemp(prefix="accuracy-")
    baselines = {}

    def save():
        out["seconds"] = time.time() - started
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)

    try:
        # vllm-fp8 first: its evaluation carries the references and the fp32 pass the
        # transformers row reuses (the FP8 export's weights are the model's own)
        for target in ("vllm-fp8", "transformers", "ascend-c8"):
            t = time.time()
            rec = os.path.join(work, f"{target}.txt")
            res = calibrate_kv_cache(model, news, tokenizer=tok, target=target, record_file=rec,
                                     num_samples=args.cal_samples, seq_len=args.cal_len, progress=False)
            if res.shortfall:
                raise SystemExit(f"{target}: calibration fell short: {res.shortfall}")
            export = os.path.join(work, target)
            if target == "vllm-fp8":
                export_vllm_fp8(rec, folder, export)
            elif target == "ascend-c8":
                export_ascend_c8(rec, folder, export)
            row = {"target": target, "served": {"transformers": "record, asymmetric INT8",
                                                "ascend-c8": "export, scale-only INT8",
                                                "vllm-fp8": "export, FP8 E4M3"}[target]}
            for corpus, texts in corpora.items():
                if target == "transformers":
                    r = evaluate_kv_quant(model, texts, rec, tokenizer=tok, references=False,
                                          baseline=baselines[corpus], **ev)
                else:  # the export's own model and tokenizer; ascend-c8 runs its own fp32 pass
                    first = target == "vllm-fp8"
                    r = evaluate_kv_quant(None, texts, export_dir=export, tokenizer=tok, references=first, **ev)
                    if first:
                        baselines[corpus] = r
                        out["fp32_ppl"][corpus] = r.baseline_ppl
                        out["references"][corpus] = r.references
                row[corpus] = {"ppl": r.quantized_ppl, "baseline_ppl": r.baseline_ppl, "interval": r.interval}
            row["seconds"] = time.time() - t
            out["rows"].append(row)
            save()
            print(f"{target}: " + ", ".join(f"{c} {cell(row[c]['interval'])}" for c in corpora)
                  + f" ({row['seconds']:.0f} s)", flush=True)
            if os.path.isdir(export):
                shutil.rmtree(export)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out["rows"].sort(key=lambda row: TARGETS.index(row["target"]))
    save()
    print_table(out)


if __name__ == "__main__":
    main()
