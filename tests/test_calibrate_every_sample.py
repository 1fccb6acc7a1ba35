"""Every calibration sample counts: msModelSlim's KV-cache min-max
observer resets on every call, so only its last sample decides the factors; ours
accumulate all of them. Changing only the FIRST text changes the record."""
import pytest

from amct_hf import calibrate_kv_cache
from amct_hf.data.bundled import default_corpus_file
from amct_hf.record.files import read_kv_factors


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_changing_only_the_first_sample_changes_the_factors(smollm2, tmp_path, granularity):
    model, tokenizer = smollm2
    lines = [line for line in open(default_corpus_file(), encoding="utf-8") if len(line) > 2000][:3]
    shouted = lines[0].upper()  # same story, other tokens: the first sample only
    params = {"act_algo": "ifmr", "quant_granularity": granularity, "asymmetric": False}

    def factors(texts, name):
        calibrate_kv_cache(model, texts, tokenizer=tokenizer, record_file=str(tmp_path / name),
                           quant_algo_params=params, num_samples=3, seq_len=64, pack=False,
                           progress=False)
        return read_kv_factors(tmp_path / name)

    base = factors(lines, "a.txt")
    changed = factors([shouted] + lines[1:], "b.txt")
    assert base.keys() == changed.keys()
    differing = [n for n in base if base[n] != changed[n]]
    assert differing, "the first sample did not reach the factors"
