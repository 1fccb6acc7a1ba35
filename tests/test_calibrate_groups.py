"""calibrate_kv_cache: channel groups, separate key/value settings and targets, checked
against the AMCT operator run by hand on the grouped values."""
import pytest
import torch

from amct_hf import QuantCalibrationOp, calibrate_kv_cache
from amct_hf.data.samples import load_texts, make_batches, tokenize_samples
from amct_hf.errors import InvalidArgumentError
from amct_hf.modeling.attention import kv_calibration
from amct_hf.naming import layer_kind

SAMPLES, SEQ = 6, 16


def states(model_dir_or_model, tok, corpus):
    """Every calibration K/V batch of the run, as the hooks hand them over."""
    from transformers import AutoModelForCausalLM
    model = model_dir_or_model
    if not isinstance(model, torch.nn.Module):
        model = AutoModelForCausalLM.from_pretrained(model).eval()
    samples = tokenize_samples(tok, load_texts(str(corpus)), seq_len=SEQ, num_samples=SAMPLES)
    keep = {}
    with torch.no_grad(), kv_calibration(model, lambda n, x: keep.setdefault(n, []).append(x.clone())):
        for batch in make_batches(samples, batch_size=1, pad_token_id=tok.pad_token_id):
            model(input_ids=batch["input_ids"], use_cache=False)
    return {n: torch.cat(v) for n, v in keep.items()}


def members(groups, channels, head_dim):
    """Channel lists of every group, from the definition (channel = head * head_dim + d)."""
    heads, half = channels // head_dim, head_dim // 2
    if groups == "head":
        return [list(range(h * head_dim, (h + 1) * head_dim)) for h in range(heads)]
    return [[h * head_dim + j, h * head_dim + half + j] for h in range(heads) for j in range(half)]


def per_group_operator(x, chans, params, tmp_path):
    """AMCT's per-tensor operator on all values of one group (exact mode's semantics)."""
    record = tmp_path / f"op{len(list(tmp_path.glob('op*.txt')))}.txt"  # a fresh record per group
    op = QuantCalibrationOp(str(record), {**params, "quant_granularity": "per_tensor"})
    op("g", x[:, chans].reshape(-1, 1))
    (s,), (o,) = op.factors["g"]
    return s, o


@pytest.mark.parametrize("groups, params", [
    ("head", {"act_algo": "ifmr", "asymmetric": True}),
    ("rope_pair", {"act_algo": "hfmg", "asymmetric": False}),
])
def test_grouped_factors_are_the_operator_run_on_each_groups_values(tiny_dir, tmp_path, groups, params):
    from transformers import AutoTokenizer
    res = calibrate_kv_cache(str(tiny_dir), str(tiny_dir / "corpus.txt"), write=False, progress=False,
                             quant_algo_params={**params, "quant_granularity": "per_channel"},
                             channel_groups=groups, num_samples=SAMPLES, seq_len=SEQ, mode="exact")
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    seen = states(tiny_dir, tok, tiny_dir / "corpus.txt")
    assert set(res.factors) == set(seen) and len(seen) == 4
    for name, x in seen.items():
        scales, offsets = res.factors[name]
        assert len(scales) == x.shape[1] == 32  # the record keeps kv_heads * head_dim entries
        for chans in members(groups, 32, 16):
            s, o = per_group_operator(x, chans, params, tmp_path)
            assert [scales[c] for c in chans] == [s] * len(chans), (name, chans)
            assert [offsets[c] for c in chans] == [o] * len(chans), (name, chans)


def test_head_dim_comes_from_the_config_not_hidden_size(tmp_path):
    import transformers as tf

    from .conftest import corpus_lines, word_tokenizer
    tok = word_tokenizer()
    torch.manual_seed(0)
    # head_dim 8 while hidden_size / heads = 16: a grouping from hidden_size would be wrong
    model = tf.Qwen3ForCausalLM(tf.Qwen3Config(vocab_size=96, hidden_size=64, intermediate_size=96,
                                               num_hidden_layers=1, num_attention_heads=4,
                                               num_key_value_heads=2, head_dim=8)).eval()
    (tmp_path / "c.txt").write_text("\n".join(corpus_lines()) + "\n")
    params = {"act_algo": "ifmr", "quant_granularity": "per_channel"}
    res = calibrate_kv_cache(model, str(tmp_path / "c.txt"), tokenizer=tok, write=False, progress=False,
                             quant_algo_params=params, channel_groups="head", num_samples=SAMPLES,
                             seq_len=SEQ, mode="exact")
    seen = states(model, tok, tmp_path / "c.txt")
    for name, x in seen.items():
        assert x.shape[1] == 16
        for chans in members("head", 16, 8):
            s, _ = per_group_operator(x, chans, params, tmp_path)
            assert [res.factors[name][0][c] for c in chans] == [s] * 8


def test_keys_and_values_take_their_own_settings(tiny_dir, tmp_path):
    kw = dict(write=False, progress=False, num_samples=SAMPLES, seq_len=SEQ)
    keys = {"act_algo": "ifmr", "quant_granularity": "per_tensor"}
    values = {"act_algo": "hfmg", "quant_granularity": "per_channel", "asymmetric": False}
    res = calibrate_kv_cache(str(tiny_dir), str(tiny_dir / "corpus.txt"), quant_algo_params=keys,
                             value_quant_algo_params=values, **kw)
    only_keys = calibrate_kv_cache(str(tiny_dir), str(tiny_dir / "corpus.txt"), quant_algo_params=keys, **kw)
    only_values = calibrate_kv_cache(str(tiny_dir), str(tiny_dir / "corpus.txt"), quant_algo_params=values, **kw)
    for name, (scales, offsets) in res.factors.items():
        want = (only_keys if layer_kind(name) == "key" else only_values).factors[name]
        assert (scales, offsets) == want, name
    assert {len(s) for n, (s, _) in res.factors.items() if layer_kind(n) == "key"} == {1}
    assert {len(s) for n, (s, _) in res.factors.items() if layer_kind(n) == "value"} == {32}
    assert res.settings.params["value"].act_algo == "hfmg" and res.params.act_algo == "ifmr"


def test_targets_write_what_their_engine_loads(tiny_dir):
    kw = dict(write=False, progress=False, num_samples=SAMPLES, seq_len=SEQ)
    c8 = calibrate_kv_cache(str(tiny_dir), str(tiny_dir / "corpus.txt"), target="ascend-c8", **kw)
    # a Llama: symmetric keys (engines ignore offsets), asymmetric values whose offsets the
    # Ascend export folds into attention biases; one range per tensor each
    assert all(len(s) == 1 for s, _ in c8.factors.values())
    assert all(o == [0] for n, (_, o) in c8.factors.items() if layer_kind(n) == "key")
    assert any(o != [0] for n, (_, o) in c8.factors.items() if layer_kind(n) == "value")
    assert c8.settings.target == "ascend-c8" and c8.settings.params["value"].asymmetric
    fp8 = calibrate_kv_cache(str(tiny_dir), str(tiny_dir / "corpus.txt"), target="vllm-fp8", **kw)
    assert all(len(s) == 1 and o == [0] for s, o in fp8.factors.values())  # one symmetric scale per tensor
    hf = calibrate_kv_cache(str(tiny_dir), str(tiny_dir / "corpus.txt"), target="transformers", **kw)
    assert set(hf.factors) == set(c8.factors) and hf.settings.params["value"].asymmetric


def test_ascend_target_without_value_centering_is_symmetric_throughout(tiny_dir):
    """Qwen2's o_proj has no bias to carry value centres: ascend-c8 calibrates its values
    symmetric, per channel ([kv_heads * head_dim]), widened by 25%."""
    from transformers import AutoTokenizer

    from .tiny_models import build

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    res = calibrate_kv_cache(build("qwen2"), str(tiny_dir / "corpus.txt"), tokenizer=tok, target="ascend-c8",
                             write=False, progress=False, num_samples=SAMPLES, seq_len=SEQ)
    assert all(set(o) == {0} for _, o in res.factors.values())
    assert all(len(s) == (1 if layer_kind(n) == "key" else 32) for n, (s, _) in res.factors.items())
    assert res.settings.range_margin == {"key": 0.0, "value": 0.25}
    assert not res.settings.params["value"].asymmetric
    # arguments are checked against the settings this model gets, before any work
    same = calibrate_kv_cache(build("qwen2"), str(tiny_dir / "corpus.txt"), tokenizer=tok, target="ascend-c8",
                              value_quant_algo_params={"quant_granularity": "per_channel"},
                              write=False, progress=False, num_samples=SAMPLES, seq_len=SEQ)
    assert same.factors == res.factors
    with pytest.raises(InvalidArgumentError, match="quant_granularity"):
        calibrate_kv_cache(build("qwen2"), str(tiny_dir / "corpus.txt"), tokenizer=tok, target="ascend-c8",
                           value_quant_algo_params={"quant_granularity": "per_tensor"}, write=False, progress=False)
    with pytest.warns(UserWarning, match="tap='proj' with per-channel"):
        calibrate_kv_cache(build("qwen2"), str(tiny_dir / "corpus.txt"), tokenizer=tok, target="ascend-c8",
                           tap="proj", write=False, progress=False, num_samples=SAMPLES, seq_len=SEQ)


def test_ascend_target_symmetric_values_on_request(tiny_dir):
    kw = dict(write=False, progress=False, num_samples=SAMPLES, seq_len=SEQ, target="ascend-c8")
    with pytest.raises(InvalidArgumentError, match="asymmetric.*value_centering=False"):
        calibrate_kv_cache(str(tiny_dir), str(tiny_dir / "corpus.txt"),
                           value_quant_algo_params={"asymmetric": False}, **kw)
    res = calibrate_kv_cache(str(tiny_dir), str(tiny_dir / "corpus.txt"), value_centering=False, **kw)
    assert all(set(o) == {0} for _, o in res.factors.values())
    assert res.settings.range_margin == {"key": 0.0, "value": 0.25}


@pytest.mark.parametrize("kwargs, match", [
    ({"target": "ascend-c8", "quant_algo_params": {"asymmetric": True}}, "asymmetric"),
    ({"target": "ascend-c8", "value_quant_algo_params": {"quant_granularity": "per_channel"}}, "quant_granularity"),
    ({"target": "transformers", "quant_algo_params": {"act_algo": "ifmr"}}, "act_algo"),
    ({"target": "vllm-fp8", "channel_groups": "head"}, "channel_groups"),
    ({"target": "ascend-c8", "range_margin": 0.3}, "range_margin"),
    ({"target": "ascend-c8", "value_quant_algo_params": {"asymmetric": False}}, "asymmetric"),
    ({"range_margin": {"key": -1}}, "range_margin"),
    ({"range_margin": {"keys": 0.1}}, "range_margin"),
    ({"target": "tensorrt"}, "not known"),
    ({"channel_groups": "head"}, "per-channel"),  # the default IFMR record is per-tensor
    ({"channel_groups": {"keys": "head"}}, "channel_groups"),
    ({"channel_groups": "layer", "quant_algo_params": {"quant_granularity": 1}}, "channel_groups"),
])
def test_conflicting_or_bad_settings_are_refused_before_the_model_loads(tiny_dir, kwargs, match, monkeypatch):
    import amct_hf.calibrate as cal

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(cal, "load_model", no_load)
    with pytest.raises(InvalidArgumentError, match=match):
        calibrate_kv_cache(str(tiny_dir), str(tiny_dir / "corpus.txt"), write=False, progress=False, **kwargs)
