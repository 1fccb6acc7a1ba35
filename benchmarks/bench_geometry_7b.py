"""Calibration at 7B attention geometry: a randomly initialised LlamaForCausalLM with
hidden 4096, 32 heads, 8 KV heads x head_dim 128 (1024 K/V channels per layer, as
Llama-2/3-7B/8B, Qwen2.5-7B, Mistral-7B), few layers and a small MLP and vocabulary so it
runs on a small machine.

    .venv/bin/python benchmarks/bench_geometry_7b.py [--layers 2] [--samples 2] [--seq-len 512] \
        [--mem-samples 1] [--mem-seq-len 256] [--dtypes float32,bfloat16] [--device cpu|cuda]

Per dtype and configuration (IFMR/HFMG x per-tensor/per-channel):

* time: ``calibrate_kv_cache`` against the forward it needs (``logits_to_keep=1``, what
  calibration asks for, see ``calibrate.no_logits_kwargs``) over the same tokens,
  alternated twice in one process, fastest of each;
* statistics: the bytes the observers of one layer (its K and V entries) hold once that
  layer has seen data, summed over their tensors (aligned histogram counts and offsets,
  IFMR's exact extremes, the CPU staging buffer); they live for every layer until the
  end of calibration, so a model needs that times its layer count;
* solve: seconds per layer of the final reduce + algorithm (what runs after the last
  forward), measured on those observers;
* peak RSS of fresh processes calibrating N and 8N tokens.

The weights and activations are random (no trained model of this size is available
offline), so outlier channels are absent: the memory figures depend on the geometry only;
the solve times depend little on the data (IFMR: a fixed candidate grid; HFMG: its early
stop may end later on real, heavy-tailed channels).
"""
from __future__ import annotations

import argparse
import sys
import time

from common import CONFIGS, compile_kernels, emit, peak_rss_mb, plain_forward, run_worker, set_threads, sync

GEOMETRY = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128)


def _setup(args, samples):
    """The model, a word-level tokenizer fitted to the news corpus, its texts and batches."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from amct_hf.data.bundled import news_corpus_path
    from amct_hf.data.samples import load_texts, make_batches, tokenize_samples
    set_threads()
    texts = load_texts(str(news_corpus_path()))
    tk = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=args.vocab,
                                                           special_tokens=["[UNK]", "[PAD]", "[EOS]"]))
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    cfg = tf.LlamaConfig(**GEOMETRY, num_hidden_layers=args.layers, intermediate_size=args.intermediate,
                         vocab_size=args.vocab, max_position_embeddings=max(4096, args.seq_len))
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    with torch.device(args.device):  # initialised where it runs: fast on a GPU
        model = tf.LlamaForCausalLM(cfg).to(dtype=dtype).eval()
    batches = make_batches(tokenize_samples(tok, texts, seq_len=args.seq_len, num_samples=samples),
                           batch_size=1, pad_token_id=tok.pad_token_id)
    return model, tok, texts, batches


def _tensor_bytes(obj) -> int:
    """Bytes of every tensor an observer holds (directly or in its histogram dataclass)."""
    import dataclasses

    import torch
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if dataclasses.is_dataclass(obj):
        return sum(_tensor_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return 0


def statistics(model, batches, params, device):
    """Observer bytes per layer (held / of which staging) and solve seconds per layer."""
    import torch

    from amct_hf.distributed import Comm
    from amct_hf.modeling.attention import KVCalibrationHooks
    from amct_hf.observers import LayerBank
    from amct_hf.settings.quant_params import parse_quant_algo_params
    collector = LayerBank(parse_quant_algo_params(params), "streaming")
    with torch.no_grad(), KVCalibrationHooks(model, collector, tap="cache"):
        for b in batches:
            model(input_ids=b["input_ids"].to(device), use_cache=False, logits_to_keep=1)
    layer0 = [o for n, o in collector.observers.items() if n.startswith("model.layers.0.")]
    held = sum(_tensor_bytes(v) for o in layer0 for v in vars(o).values())
    staging = sum(_tensor_bytes(getattr(o, "_stage", None)) for o in layer0)
    comm, solve = Comm(), 0.0
    for obs in collector.observers.values():
        _ = obs.hist  # adds the staged values: that is per-batch work, not the solve
        sync(device)
        start = time.perf_counter()
        obs.reduce(comm)
        scales, offsets = obs.compute()
        scales.cpu(), offsets.cpu()
        solve += time.perf_counter() - start
    layers = len(collector.observers) // 2
    return {"stats_bytes_per_layer": held, "staging_bytes_per_layer": staging, "layers": layers,
            "solve_s_per_layer": solve / layers}


def worker(args):
    import torch

    from amct_hf import calibrate_kv_cache
    samples = args.samples if args.kind == "time" else args.mem_samples
    if args.kind == "memory":
        args.seq_len = args.mem_seq_len
    model, tok, texts, batches = _setup(args, samples)
    params = {"act_algo": args.algo, "quant_granularity": args.granularity}
    plain_forward(model, batches[:1], logits_to_keep=1)  # warm-up (allocator, kernels)
    compile_kernels(model, texts, tok, params)
    out = {"kind": args.kind, "dtype": args.dtype, "algo": args.algo, "granularity": args.granularity,
           "tokens": samples * args.seq_len, "rss_before_calibration_mb": peak_rss_mb()}

    def calibrate():
        calibrate_kv_cache(model, texts, tokenizer=tok, quant_algo_params=params, num_samples=samples,
                           seq_len=args.seq_len, progress=False, write=False)
        sync(args.device)

    forward_s, calibrate_s = [], []
    for _ in range(2 if args.kind == "time" else 1):  # alternated: this machine's speed drifts
        if args.kind == "time":
            start = time.perf_counter()
            plain_forward(model, batches, logits_to_keep=1)
            forward_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        calibrate()
        calibrate_s.append(time.perf_counter() - start)
    out["calibrate_s"], out["calibrate_all_s"] = min(calibrate_s), calibrate_s
    out["peak_rss_mb"] = peak_rss_mb()
    if args.device.startswith("cuda"):
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if forward_s:
        out["forward_s"], out["forward_all_s"] = min(forward_s), forward_s
        out.update(statistics(model, batches, params, args.device))
    emit(out)


def run(args, kind, dtype, algo, gran):
    cmd = [__file__, "--worker", kind, "--dtype", dtype, "--algo", algo, "--granularity", gran]
    for flag in ("layers", "intermediate", "vocab", "samples", "seq_len", "mem_samples", "mem_seq_len",
                 "device"):
        cmd += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
    return run_worker(cmd, what=f"worker {kind} {dtype} {algo} {gran}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=1024, help="MLP width (7B: 11008-14336)")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=2, help="timing: samples of --seq-len tokens")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--mem-samples", type=int, default=1, help="memory: N samples (and 8 N)")
    ap.add_argument("--mem-seq-len", type=int, default=256)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--worker", choices=("time", "memory"))
    ap.add_argument("--dtype"), ap.add_argument("--algo"), ap.add_argument("--granularity")
    args = ap.parse_args()
    if args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            sys.exit(f"--device {args.device}: CUDA is not available to this torch ({torch.__version__})")
    if args.worker:
        args.kind = args.worker
        return worker(args)
    print(f"7B attention geometry (hidden 4096, 32 heads, 8 KV heads x 128), {args.layers} layers, "
          f"MLP {args.intermediate}, vocab {args.vocab}, random weights, device {args.device}; "
          f"time: {args.samples} x {args.seq_len} tokens; peak RSS: {args.mem_samples} x {args.mem_seq_len} (N) "
          f"and {8 * args.mem_samples} x {args.mem_seq_len} (8N) tokens")
    # on CUDA the peak that matters is the device's (torch.cuda.max_memory_allocated)
    peak = "peak CUDA memory" if args.device.startswith("cuda") else "peak RSS"
    key = "cuda_peak_mb" if args.device.startswith("cuda") else "peak_rss_mb"
    print("| dtype | algorithm | granularity | forward, logits_to_keep=1 (s) | calibrate (s) | ratio | "
          f"statistics per layer (MiB) | of which staging (MiB) | solve per layer (s) | {peak} N (MB) | "
          f"{peak} 8N (MB) | 8N / N |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for dtype in args.dtypes.split(","):
        for algo, gran in CONFIGS:
            t = run(args, "time", dtype, algo, gran)
            m1 = run(args, "memory", dtype, algo, gran)
            m8 = run(_scaled(args), "memory", dtype, algo, gran)
            print(f"| {dtype} | {algo} | {gran} | {t['forward_s']:.2f} | {t['calibrate_s']:.2f} | "
                  f"{t['calibrate_s'] / t['forward_s']:.3f} | {t['stats_bytes_per_layer'] / 2**20:.2f} | "
                  f"{t['staging_bytes_per_layer'] / 2**20:.2f} | {t['solve_s_per_layer']:.3f} | "
                  f"{m1[key]:.0f} | {m8[key]:.0f} | {m8[key] / m1[key]:.3f} |",
                  flush=True)


def _scaled(args):
    scaled = argparse.Namespace(**vars(args))
    scaled.mem_samples = 8 * args.mem_samples
    return scaled


if __name__ == "__main__":
    main()
