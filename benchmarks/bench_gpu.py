"""Calibration on an accelerator against the forward it needs, and the INT8 cache in decode.

A randomly initialised ``LlamaForCausalLM`` of Llama-3-8B geometry (32 layers, hidden 4096,
32 heads, 8 KV heads x 128, MLP 14336, vocabulary 128256, bf16) is built on the device from
its config (no download, no checkpoint). Text comes from a built-in generator of
pseudo-words and a word-level tokenizer fitted to it locally, so nothing outside this
repository is needed (no SmolLM2, no corpus download).

Rows (one JSON line each):

* ``kind="warm-up"``: every row run once on one short sample first, where the kernels are
  compiled (Triton's on CUDA, numba's on CPU; once per process, cached on disk): its
  seconds are what a first calibration in a fresh process adds, kept out of the rows below.
* ``kind="calibration"``, per configuration (IFMR/HFMG x per-tensor/per-channel, asymmetric)
  and per target (``ascend-c8``, ``transformers``, ``vllm-fp8``): ``calibrate_kv_cache``
  over ``--samples`` x ``--seq-len`` tokens (batch size 1) timed between two runs of the
  ``logits_to_keep=1, use_cache=False`` forward over the same samples; ``ratio`` is against
  the faster forward. ``stats_peak_gib``: peak device memory during calibration minus the
  forward's peak (what the statistics add).
* ``kind="decode"``, per prompt x batch (``--decode``): ``DynamicCache`` (bf16) against
  ``StaticInt8KVCache`` with the factors just calibrated: cache bytes after the prompt,
  peak device memory over the weights, milliseconds per decode step (``--decode-steps``).

    python benchmarks/bench_gpu.py                  # the full table on a GPU (about 4-6 min on an H200)
    python benchmarks/bench_gpu.py --small          # a tiny geometry on CPU, seconds: a smoke test

On CPU (``--small``) memory figures are null.
"""
from __future__ import annotations

import argparse
import json
import time

GEOMETRY_8B = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                   num_hidden_layers=32, intermediate_size=14336, vocab_size=128256,
                   max_position_embeddings=32768, rope_theta=500000.0)
GEOMETRY_SMALL = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      num_hidden_layers=2, intermediate_size=128, vocab_size=512,
                      max_position_embeddings=1024)

ROWS = [
    ("ifmr per-tensor asym", {"quant_algo_params": {"act_algo": "ifmr", "quant_granularity": 0}}),
    ("ifmr per-channel asym", {"quant_algo_params": {"act_algo": "ifmr", "quant_granularity": 1}}),
    ("hfmg per-tensor asym", {"quant_algo_params": {"act_algo": "hfmg", "quant_granularity": 0}}),
    ("hfmg per-channel asym", {"quant_algo_params": {"act_algo": "hfmg", "quant_granularity": 1}}),
    ("target ascend-c8", {"target": "ascend-c8"}),
    ("target transformers", {"target": "transformers"}),
    ("target vllm-fp8", {"target": "vllm-fp8"}),
]


def pseudo_texts(words: int, docs: int, seed: int = 0) -> list[str]:
    """Deterministic text: Zipf-like draws from a few thousand generated pseudo-words."""
    import torch
    g = torch.Generator().manual_seed(seed)
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    vocab = []
    for i in range(4000):
        n = 2 + int(torch.randint(0, 8, (1,), generator=g))
        vocab.append("".join(letters[int(j)] for j in torch.randint(0, 26, (n,), generator=g)) + str(i % 7))
    weights = 1.0 / torch.arange(1, len(vocab) + 1, dtype=torch.float64)
    ids = torch.multinomial(weights, words, replacement=True, generator=g)
    per = max(1, words // docs)
    return [" ".join(vocab[int(i)] for i in ids[d:d + per]) for d in range(0, words, per)]


def word_tokenizer(texts, vocab_size):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=vocab_size,
                                                           special_tokens=["[UNK]", "[PAD]", "[EOS]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


class Device:
    def __init__(self, name):
        import torch
        self.torch, self.name = torch, name
        self.cuda = name.startswith("cuda")

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self):
        if self.cuda:
            self.sync()
            self.torch.cuda.reset_peak_memory_stats()

    def peak(self):
        return self.torch.cuda.max_memory_allocated() if self.cuda else None

    def allocated(self):
        return self.torch.cuda.memory_allocated() if self.cuda else None


def timed(dev, fn):
    dev.reset_peak()
    start = time.perf_counter()
    out = fn()
    dev.sync()
    return time.perf_counter() - start, dev.peak(), out


def gib(n):
    return None if n is None else round(n / 2**30, 3)


def main(argv=None):
    import torch
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny geometry and token count (CPU smoke test)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--samples", type=int, default=None, help="default 64 (small: 2)")
    ap.add_argument("--seq-len", type=int, default=None, help="default 2048 (small: 64)")
    ap.add_argument("--rows", default="all", help="comma list of row indices (0-6) or 'all'")
    ap.add_argument("--decode", default=None, help="prompt x batch list, default 8192x4,32768x1 (small: 64x2)")
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args(argv)
    dev = Device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    samples = args.samples or (2 if args.small else 64)
    seq_len = args.seq_len or (64 if args.small else 2048)
    decode = args.decode if args.decode is not None else ("64x2" if args.small else "8192x4,32768x1")
    geometry = GEOMETRY_SMALL if args.small else GEOMETRY_8B
    if dev.cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # the factors of a float32 model equal CPU's

    import transformers as tf

    from amct_hf import calibrate_kv_cache
    from amct_hf.data.samples import make_batches, tokenize_samples
    texts = pseudo_texts(words=int(samples * seq_len * 1.1) + 1000, docs=max(8, samples))
    tok = word_tokenizer(texts, min(geometry["vocab_size"], 30000))
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    with torch.device(dev.name):  # initialised where it runs: seconds on a GPU
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**geometry)).to(dtype=dtype).eval()
    weights = dev.allocated()
    batches = make_batches(tokenize_samples(tok, texts, seq_len=seq_len, num_samples=samples),
                           batch_size=1, pad_token_id=tok.pad_token_id)

    def forward():
        with torch.no_grad():
            for b in batches:
                model(input_ids=b["input_ids"].to(dev.name), use_cache=False, logits_to_keep=1)

    common = dict(tokenizer=tok, num_samples=samples, seq_len=seq_len, progress=False, write=False)
    forward()  # warm-up: allocator, kernels
    rows = ROWS if args.rows == "all" else [ROWS[int(i)] for i in args.rows.split(",")]
    # warm-up of every row: numba (CPU) or Triton (CUDA) compile their kernels on first use,
    # once per process (Triton also caches them on disk); said apart from the timed rows
    start = time.perf_counter()
    for _, kwargs in rows:
        calibrate_kv_cache(model, texts, **{**common, "num_samples": 1, "seq_len": min(seq_len, 64)}, **kwargs)
    dev.sync()
    print(json.dumps({"kind": "warm-up", "device": dev.name, "rows": len(rows),
                      "seconds": round(time.perf_counter() - start, 3)}), flush=True)
    factors = None
    for name, kwargs in rows:
        f1, peak_f1, _ = timed(dev, forward)
        cal, peak_cal, result = timed(dev, lambda: calibrate_kv_cache(model, texts, **common, **kwargs))
        f2, peak_f2, _ = timed(dev, forward)
        fwd = min(f1, f2)
        peak_fwd = None if peak_f1 is None else min(peak_f1, peak_f2)
        print(json.dumps({
            "kind": "calibration", "row": name, "device": dev.name, "samples": samples, "seq_len": seq_len,
            "calibrate_s": round(cal, 3), "forward_s": round(fwd, 3), "ratio": round(cal / fwd, 3),
            "stats_peak_gib": None if peak_cal is None else gib(peak_cal - peak_fwd),
            "entries": len(result.factors)}), flush=True)
        if name == "target transformers" or factors is None:
            factors = dict(result.factors)
    for spec in filter(None, decode.split(",")):
        prompt, batch = (int(v) for v in spec.lower().split("x"))
        for cache_kind in ("dynamic", "int8"):
            print(json.dumps(decode_row(model, factors, prompt, batch, args.decode_steps, cache_kind, dev,
                                        weights, geometry["vocab_size"])), flush=True)


def decode_row(model, factors, prompt, batch, steps, cache_kind, dev, weights, vocab):
    import torch
    from transformers import DynamicCache

    from amct_hf.modeling.cache import StaticInt8KVCache, cache_nbytes
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (batch, prompt), generator=g).to(dev.name)
    cache = DynamicCache() if cache_kind == "dynamic" else StaticInt8KVCache.from_record(factors, model)
    dev.reset_peak()
    with torch.no_grad():
        out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1:].argmax(-1)
        dev.sync()
        size = cache_nbytes(cache)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=nxt, cache=cache, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1:].argmax(-1)
        dev.sync()
        step_ms = (time.perf_counter() - start) / steps * 1e3
    peak = dev.peak()
    del cache, out
    return {"kind": "decode", "cache": cache_kind, "device": dev.name, "prompt": prompt, "batch": batch,
            "cache_gib": gib(size), "cache_bytes": size,
            "peak_over_weights_gib": None if peak is None else gib(peak - weights),
            "decode_ms_per_step": round(step_ms, 2), "steps": steps}


if __name__ == "__main__":
    main()
