"""What several benchmarks share: the SmolLM2 set-up, the plain forward they are timed
against, timing and memory read-outs, and the worker processes that report one JSON line.

The benchmarks run as ``.venv/bin/python benchmarks/NAME.py``: Python puts this folder on
``sys.path``, so ``from common import ...`` needs nothing else.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

# the four configurations every calibration benchmark times
CONFIGS = [("ifmr", "per_tensor"), ("ifmr", "per_channel"), ("hfmg", "per_tensor"), ("hfmg", "per_channel")]


def set_threads(default: int = 2) -> int:
    """Torch's CPU threads: ``BENCH_THREADS`` or ``default`` (the figures are for 2 cores)."""
    import torch
    threads = int(os.environ.get("BENCH_THREADS", str(default)))
    torch.set_num_threads(threads)
    return threads


def sync(device) -> None:
    """Waits for queued CUDA work: a timer must see the work, not its launch."""
    import torch
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn):
    """``(fn(), seconds)``."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def proc_status_mb(key: str) -> float | None:
    """A memory line of /proc/self/status (``"VmRSS:"`` now, ``"VmHWM:"`` peak), MB;
    None where there is no such file."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def smollm2_setup(samples: int, seq_len: int):
    """SmolLM2-135M fp32 (on ``BENCH_DEVICE``, default cpu), its tokenizer, the news corpus
    and the ``samples`` x ``seq_len`` batches (one sample each) the timings run over."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from amct_hf.data.bundled import news_corpus_path, smollm2_folder
        from amct_hf.data.samples import load_texts, make_batches, tokenize_samples
    except ImportError:  # an older checkout (compare_checkouts.py), before the data package
        from amct_hf.assets import news_corpus_path, smollm2_folder

        from amct_hf.data import load_texts, make_batches, tokenize_samples
    set_threads()
    folder = smollm2_folder()
    model = AutoModelForCausalLM.from_pretrained(folder).eval().to(os.environ.get("BENCH_DEVICE", "cpu"))
    # On CPU the weights are views of the mmapped safetensors file, whose pages the kernel may
    # drop and read back; a private copy puts them in the same kind of memory as a deep copy
    # of the model (tied weights stay tied: one Parameter each)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.clone()
    tok = AutoTokenizer.from_pretrained(folder)
    texts = load_texts(str(news_corpus_path()))
    batches = make_batches(tokenize_samples(tok, texts, seq_len=seq_len, num_samples=samples),
                           batch_size=1, pad_token_id=tok.pad_token_id)
    return model, tok, texts, batches


def plain_forward(model, batches, **kwargs) -> None:
    """The model over ``batches`` without any hook (``kwargs``: e.g. ``logits_to_keep=1``,
    the forward calibration asks for)."""
    import torch
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"].to(model.device), use_cache=False, **kwargs)
    sync(model.device)


def compile_kernels(model, texts, tok, params) -> None:
    """A tiny calibration: compiles the algorithms' kernels outside the timed runs."""
    from amct_hf import calibrate_kv_cache
    calibrate_kv_cache(model, texts, tokenizer=tok, quant_algo_params=params, num_samples=1, seq_len=16,
                       progress=False, write=False)


def emit(record: dict) -> None:
    """A worker's result: one JSON line on stdout."""
    print(json.dumps(record), flush=True)


def run_worker(args, *, env=None, cwd=None, what: str = "worker") -> dict:
    """Runs ``python args...`` in a fresh process and returns the JSON line it printed last;
    a failure exits with the end of its stderr."""
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=cwd, check=False)
    if proc.returncode:
        sys.exit(f"{what} failed (exit status {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
