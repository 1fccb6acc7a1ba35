"""KV-cache calibration recipe for Qwen2 / Qwen2.5 / Qwen3 models.

No Qwen weights ship with this package: set MODEL below or pass --model (a model id or a
local folder):

    python recipes/qwen.py --model Qwen/Qwen2.5-0.5B-Instruct
    accelerate launch --multi_gpu --num_processes 2 recipes/qwen.py --model /models/qwen  # 2 CPU ranks
    accelerate launch --num_processes 4 recipes/qwen.py --model Qwen/Qwen3-8B           # 4 GPUs

Samples are split between processes; the main process writes RECORD_FILE.
"""
import argparse
import json
import os

from amct_hf.calibrate import calibrate_kv_cache

MODEL = None  # required, e.g. "Qwen/Qwen2.5-0.5B-Instruct" or a local folder
# None: the bundled news corpus (gensim's Lee corpus). Or a text/json/jsonl/parquet/csv file,
# a folder, or a datasets name already in the local cache.
DATASET = None
SPLIT = "train"
TEXT_COLUMN = "text"
NUM_SAMPLES = 128  # the usual recipe: 128 samples x 2048 tokens
SEQ_LEN = 2048
BATCH_SIZE = 1
# Per-tensor HFMG, asymmetric. Per-tensor because per-channel ranges fitted on one corpus
# can clip channels on another: a channel that stayed small on the calibration text gets a
# tight range and saturates when other text drives it harder, while one shared range per
# layer leaves head-room. HFMG fits that range from a histogram, which tolerates the rare
# large key/value outliers without letting them set the whole range.
QUANT_ALGO_PARAMS = {
    "act_algo": "hfmg",
    "quant_granularity": "per_tensor",
    "asymmetric": True,
    "num_of_bins": 4096,
}
TAP = "cache"  # K/V exactly as the KV cache stores them (post-RoPE, after Qwen3's k_norm)
RECORD_FILE = "kv_cache.txt"

NO_MODEL = ("no model given: set MODEL at the top of recipes/qwen.py or pass --model "
            "(a model id such as Qwen/Qwen2.5-0.5B-Instruct, or a local folder); "
            "no Qwen weights are bundled")


def main(model=MODEL, dataset=DATASET, split=SPLIT, text_column=TEXT_COLUMN,
         num_samples=NUM_SAMPLES, seq_len=SEQ_LEN, batch_size=BATCH_SIZE,
         quant_algo_params=QUANT_ALGO_PARAMS, tap=TAP, record_file=RECORD_FILE):
    if model is None:
        raise ValueError(NO_MODEL)
    if dataset is None:
        from amct_hf import assets
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
    args = p.parse_args()
    if args.model is None:
        p.error(NO_MODEL)  # usage + the message, exit status 2
    main(**vars(args))
