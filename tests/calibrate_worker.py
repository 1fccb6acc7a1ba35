"""Run calibrate_kv_cache from a saved model folder, once per quant_algo_params of a JSON
list; launched by tests with torchrun (several gloo ranks on CPU) or plain python."""
import json
import sys

from amct_hf import calibrate_kv_cache
from amct_hf.distributed import Comm


def main():
    model_dir, corpus, record_prefix, params_list, batch_size, mode = sys.argv[1:7]
    for i, params in enumerate(json.loads(params_list)):
        calibrate_kv_cache(model_dir, corpus, record_file=f"{record_prefix}{i}.txt", quant_algo_params=params,
                           num_samples=7, seq_len=24, batch_size=int(batch_size), mode=mode, progress=False)
    comm = Comm()
    print(f"rank={comm.rank} world_size={comm.world_size}", flush=True)


if __name__ == "__main__":
    main()
