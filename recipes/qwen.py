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
DEFAULTS = dict(model=MODEL, dataset=DATASET, split=SPLIT, text_column=TEXT_COLUMN,
                num_samples=NUM_SAMPLES, seq_len=SEQ_LEN, batch_size=BATCH_SIZE,
                params=json.dumps(QUANT_ALGO_PARAMS), tap=TAP, record=RECORD_FILE)

if __name__ == "__main__":
    status = run_recipe(DEFAULTS, description=__doc__.splitlines()[0], model_required=NO_MODEL)
    if status:
        sys.exit(status)
