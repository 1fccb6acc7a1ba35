"""KV-cache calibration recipe for Qwen2 / Qwen2.5 / Qwen3 models.

No Qwen weights ship with this package: set MODEL below or pass --model (a model id or a
local folder). Every flag of `amct-hf calibrate` works here (see --help). Run with the
project's environment (`.venv/bin/python`, or after `source .venv/bin/activate`):

    .venv/bin/python recipes/qwen.py --model Qwen/Qwen2.5-0.5B-Instruct
    .venv/bin/accelerate launch --multi_gpu --num_processes 2 recipes/qwen.py --model /models/qwen  # 2 CPU ranks
    .venv/bin/accelerate launch --num_processes 4 recipes/qwen.py --model Qwen/Qwen3-8B           # 4 GPUs

Samples are split between processes; the main process writes RECORD_FILE.
"""
import json
import sys

from amct_hf.cli import run_recipe

MODEL = None  # required, e.g. "Qwen/Qwen2.5-0.5B-Instruct" or a local folder
# None: the bundled news corpus (gensim's Lee corpus). Or a text/json/jsonl/parquet/csv file,
# a folder, or a datasets name already in the local cache.
DATASET = None
SPLIT = "train"
TEXT_COLUMN = "text"
NUM_SAMPLES = 128  # the usual recipe: 128 samples x 2048 tokens
SEQ_LEN = 2048
BATCH_SIZE = 1
# The engine the factors are for (a `--target` of `amct-hf calibrate`): it picks the
# quantization settings measured best for what that engine serves (docs/accuracy.md).
# "transformers" (StaticInt8KVCache): HFMG, per-tensor, asymmetric. Others: "ascend-c8"
# (vllm-ascend / MindIE), "vllm-fp8". Quantization flags on the command line must agree
# with the target. For settings of your own, set TARGET = None and fill QUANT_ALGO_PARAMS
# (AMCT's quant_algo_params, e.g. {"act_algo": "ifmr"} for AMCT's own defaults).
TARGET = "transformers"
QUANT_ALGO_PARAMS = None
TAP = "cache"  # K/V exactly as the KV cache stores them (post-RoPE, after Qwen3's k_norm)
RECORD_FILE = "kv_cache.txt"

NO_MODEL = ("no model given: set MODEL at the top of recipes/qwen.py or pass --model "
            "(a model id such as Qwen/Qwen2.5-0.5B-Instruct, or a local folder); "
            "no Qwen weights are bundled")
DEFAULTS = dict(model=MODEL, dataset=DATASET, split=SPLIT, text_column=TEXT_COLUMN,
                num_samples=NUM_SAMPLES, seq_len=SEQ_LEN, batch_size=BATCH_SIZE,
                target=TARGET, params=json.dumps(QUANT_ALGO_PARAMS) if QUANT_ALGO_PARAMS else None,
                tap=TAP, record=RECORD_FILE)

if __name__ == "__main__":
    status = run_recipe(DEFAULTS, description=__doc__.splitlines()[0], model_required=NO_MODEL)
    if status:
        sys.exit(status)
