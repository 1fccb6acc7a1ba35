"""Reading exported directories back, as the loaders do."""
import json
import os


def load_dir_tensors(out_dir):
    """Every tensor of an exported directory, through its index (as loaders read it)."""
    from safetensors.torch import load_file

    index = [n for n in os.listdir(out_dir) if n.endswith(".safetensors.index.json")]
    assert len(index) == 1, index
    with open(os.path.join(out_dir, index[0])) as f:
        weight_map = json.load(f)["weight_map"]
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        loaded = load_file(os.path.join(out_dir, shard))
        assert {n for n, s in weight_map.items() if s == shard} == set(loaded), shard
        tensors.update(loaded)
    return tensors, weight_map
