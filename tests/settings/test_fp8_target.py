"""The vllm-fp8 target: symmetric per-tensor HFMG ranges widened by 50% (chosen by
E4M3-simulated perplexity, docs/serving.md), exactly 1.5 x the plain HFMG scales."""
import pytest

from amct_hf import calibrate_kv_cache


def test_vllm_fp8_target_is_hfmg_widened_by_half(tiny_dir):
    kw = dict(write=False, progress=False, num_samples=4, seq_len=32)
    fp8 = calibrate_kv_cache(str(tiny_dir), str(tiny_dir / "corpus.txt"), target="vllm-fp8", **kw)
    plain = calibrate_kv_cache(str(tiny_dir), str(tiny_dir / "corpus.txt"), quant_algo_params={
        "act_algo": "hfmg", "asymmetric": False, "quant_granularity": "per_tensor"}, **kw)
    assert fp8.settings.range_margin == {"key": 0.5, "value": 0.5}
    assert set(fp8.factors) == set(plain.factors)
    for name, ((s,), (o,)) in fp8.factors.items():
        (p,), (po,) = plain.factors[name]
        assert o == po == 0
        assert s == pytest.approx(1.5 * p, rel=1e-6)
