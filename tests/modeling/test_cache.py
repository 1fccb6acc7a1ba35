"""StaticInt8KVCache: int8 storage with a record's factors, usable by ``generate``.

Tiny models (from configs) check the cache against the fake-quant evaluation path step
by step; the real SmolLM2 checks memory, greedy-token agreement and the dequantization
bound with a calibrated record.
"""
import inspect
import warnings

import pytest
import torch

from amct_hf import write_kv_factors
from amct_hf.errors import RecordMismatchError
from amct_hf.evaluation.perplexity import StaticFakeQuant
from amct_hf.modeling.attention import kv_calibration, kv_transform
from amct_hf.modeling.cache import StaticInt8KVCache, StaticInt8Layer, StaticInt8SlidingWindowLayer, cache_nbytes
from amct_hf.modeling.layout import kv_layout

VOCAB = 96


def cache_kw(model, cache):
    # transformers 5 renamed `past_key_values` to `cache` (the old name still works, with a
    # FutureWarning): use the forward's own name
    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}


def tiny(kind):
    import transformers as tf
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  initializer_range=0.1)
    if kind == "llama":
        cfg, cls = tf.LlamaConfig(**common), tf.LlamaForCausalLM
    elif kind == "mistral":  # every layer sliding (window 8)
        cfg, cls = tf.MistralConfig(**common, sliding_window=8), tf.MistralForCausalLM
    else:  # gemma3: sliding and global layers, 1 KV head
        cfg = tf.Gemma3TextConfig(**{**common, "num_key_value_heads": 1, "num_hidden_layers": 3},
                                  head_dim=16, sliding_window=8, layer_types=None)
        cls = tf.Gemma3ForCausalLM
    torch.manual_seed(0)
    return cls(cfg).eval()


def minmax_record(model, ids, per_channel=True, shrink=0.8):
    """Factors from the model's own K/V ranges, shrunk so that some values clip."""
    lo, hi = {}, {}

    def observe(name, x):
        x = x if per_channel else x.reshape(-1, 1)
        lo[name] = torch.minimum(lo.get(name, x.min(0).values), x.min(0).values)
        hi[name] = torch.maximum(hi.get(name, x.max(0).values), x.max(0).values)

    with torch.no_grad(), kv_calibration(model, observe):
        model(ids)
    out = {}
    for name in lo:
        a, b = lo[name].clamp(max=0), hi[name].clamp(min=0)
        s = (b - a) / 255 * shrink
        # offsets stay on the INT8 grid (zero representable), as every calibrated record's do
        out[name] = (s.tolist(), [int(v) for v in torch.round(-128 - a / s).clamp(-128, 127)])
    return out


@pytest.mark.parametrize("kind", ["llama", "mistral", "gemma3"])
@pytest.mark.parametrize("per_channel", [True, False])
def test_cache_steps_equal_fake_quant_full_forward(kind, per_channel, tmp_path):
    """Prefill + token-by-token decoding through the int8 cache gives the logits of one
    full forward with K/V fake-quantized by the same factors (the evaluator's path):
    static factors quantize each token once, whenever it enters the cache."""
    model = tiny(kind)
    ids = torch.randint(1, VOCAB, (2, 14), generator=torch.Generator().manual_seed(1))
    factors = minmax_record(model, ids, per_channel)
    write_kv_factors(tmp_path / "kv.txt", factors)
    cache = StaticInt8KVCache.from_record(tmp_path / "kv.txt", model)
    expected = StaticInt8Layer if kind == "llama" else StaticInt8SlidingWindowLayer
    assert all(type(layer) is expected for layer in cache.layers)
    with torch.no_grad():
        with kv_transform(model, StaticFakeQuant(factors)):
            full = model(ids, use_cache=False).logits
        steps = [model(ids[:, :6], use_cache=True, **cache_kw(model, cache)).logits]
        for t in range(6, ids.shape[1]):
            steps.append(model(ids[:, t:t + 1], use_cache=True, **cache_kw(model, cache)).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-5, rtol=1e-5)
    assert cache.get_seq_length() == ids.shape[1]
    layer = cache.layers[0]
    assert layer.keys.dtype == torch.int8 and layer.values.dtype == torch.int8
    if kind != "llama":  # the sliding window keeps window - 1 tokens
        assert layer.keys.shape[-2] == 7


def test_generate_with_int8_cache_follows_fake_quant_greedy_path(tmp_path):
    model = tiny("llama")
    ids = torch.randint(1, VOCAB, (1, 8), generator=torch.Generator().manual_seed(2))
    factors = minmax_record(model, ids)
    cache = StaticInt8KVCache.from_record(factors, model)
    out = model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                         **cache_kw(model, cache))
    with torch.no_grad(), kv_transform(model, StaticFakeQuant(factors)):
        logits = model(out, use_cache=False).logits
    assert torch.equal(logits[0, 7:-1].argmax(-1), out[0, 8:])
    assert cache.get_seq_length() == out.shape[1] - 1  # the last token was never fed back


def test_mismatching_record_is_refused(tmp_path):
    model = tiny("llama")
    good = minmax_record(model, torch.randint(1, VOCAB, (1, 6)))
    bad = dict(good)
    s, o = bad["model.layers.1.self_attn.v_proj"]
    bad["model.layers.1.self_attn.v_proj"] = (s[:16], o[:16])
    with pytest.raises(RecordMismatchError, match=r"'model\.layers\.1\.self_attn\.v_proj' has 16 scales"):
        StaticInt8KVCache.from_record(bad, model)
    del bad["model.layers.0.self_attn.k_proj"]
    with pytest.raises(RecordMismatchError, match=r"'model\.layers\.0\.self_attn\.k_proj' is not in"):
        StaticInt8KVCache.from_record(bad, model)
    with pytest.raises(FileNotFoundError):
        StaticInt8KVCache.from_record(tmp_path / "missing.txt", model)


def test_layout_maps_record_keys_to_cache_layers():
    layout = kv_layout(tiny("gemma3"))
    assert [(n, s.layer_idx, s.channels) for n, s in layout.items()] == [
        (f"model.layers.{i}.self_attn.{p}_proj", i, 16) for i in range(3) for p in "kv"]


# --------------------------------------------------------------------------- real SmolLM2

PROMPTS = [
    "The Prime Minister said on Tuesday that the government",
    "Scientists have discovered a new species of",
    "The stock market fell sharply after",
    "Once upon a time, in a small village,",
    "The best way to learn a new language is",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def smollm2(smollm2_dir, tmp_path_factory):
    """SmolLM2 (float32) and the recommended record: per-channel HFMG calibrated on the
    news corpus (16 x 512 tokens, default streaming mode)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from amct_hf.calibrate import calibrate_kv_cache
    from amct_hf.data.bundled import news_corpus_path

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    record = tmp_path_factory.mktemp("smol") / "kv.txt"
    calibrate_kv_cache(model, str(news_corpus_path()), tokenizer=tok, record_file=record,
                       quant_algo_params={"act_algo": "hfmg", "quant_granularity": "per_channel"},
                       num_samples=16, seq_len=512, progress=False)
    return model, tok, record


def test_smollm2_memory_and_greedy_agreement(smollm2):
    """5 prompts x 32 greedy tokens (one left-padded batch), fp32 DynamicCache vs int8.

    Asserted: the teacher-forced agreement (the int8 cache decoding along the fp32 greedy
    path) >= 90% of the 160 positions. Only reported: the free-running position-wise
    agreement (the int8 run's own greedy tokens against the fp32 run's). It is chaotic:
    after a flip at an fp32 near-tie (top-2 logit margins of 0.005-0.1 here) the
    continuations differ wholesale, so records of similar perplexity score anywhere from
    0.5 to 1.0 (docs/accuracy.md) and a bound on it fails on the last float.
    """
    from transformers import DynamicCache
    model, tok, record = smollm2
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    prompt_len = enc.input_ids.shape[1]
    runs = {}
    for name in ("fp32", "int8"):
        cache = DynamicCache(config=model.config) if name == "fp32" else StaticInt8KVCache.from_record(record, model)
        with warnings.catch_warnings():  # as the README calls it: no deprecation warning
            warnings.simplefilter("error", FutureWarning)
            out = model.generate(**enc, cache=cache, max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS, do_sample=False)
        runs[name] = (out[:, prompt_len:], cache)
    (fp, fp_cache), (q, q_cache) = runs["fp32"], runs["int8"]
    assert fp.shape == q.shape == (len(PROMPTS), NEW_TOKENS)

    # memory at the same length: int8 states are a quarter of float32 ones; the factors
    # (30 layers x 2 x 192 x (scale + offset)) are a fixed cost, reported apart
    assert q_cache.get_seq_length() == fp_cache.get_seq_length() == prompt_len + NEW_TOKENS - 1
    ratio = cache_nbytes(q_cache) / cache_nbytes(fp_cache)
    with_factors = cache_nbytes(q_cache, factors=True) / cache_nbytes(fp_cache)
    assert ratio <= 0.30, ratio
    assert cache_nbytes(q_cache, factors=True) - cache_nbytes(q_cache) == 30 * 2 * 2 * 192 * 4

    # teacher forcing: feed the fp32 tokens through a fresh int8 cache, step by step
    cache = StaticInt8KVCache.from_record(record, model)
    mask = enc.attention_mask
    picks = []
    with torch.no_grad():
        ids, pos = enc.input_ids, (mask.cumsum(-1) - 1).clamp(min=0)
        for t in range(NEW_TOKENS):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                           **cache_kw(model, cache)).logits
            picks.append(logits[:, -1].argmax(-1))
            ids, mask = fp[:, t:t + 1], torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            pos = mask.sum(-1, keepdim=True) - 1
    forced = float((torch.stack(picks, 1) == fp).float().mean())
    free = float((q == fp).float().mean())
    print(f"\nSmolLM2 int8 vs fp32 over {fp.numel()} greedy tokens: teacher-forced agreement "
          f"{forced:.3f}, free-running position-wise {free:.3f}; KV bytes at "
          f"{q_cache.get_seq_length()} tokens x {len(PROMPTS)}: {ratio:.3f} of fp32 "
          f"({with_factors:.3f} with the factors)")
    assert forced >= 0.9


def test_smollm2_cache_dequantizes_within_half_a_step(smollm2):
    """Real post-RoPE K/V of a prompt (from the default cache) written into the int8
    cache come back within s/2 where they lie in the representable range, and at the
    range's end where they do not."""
    from transformers import DynamicCache

    from amct_hf import read_kv_factors
    model, tok, record = smollm2
    ids = tok(" ".join(PROMPTS), return_tensors="pt").input_ids
    fp = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, use_cache=True, **cache_kw(model, fp))
    factors = read_kv_factors(record)
    cache = StaticInt8KVCache.from_record(record, model)
    heads, dim = fp.layers[0].keys.shape[1], fp.layers[0].keys.shape[-1]
    checked = clipped = 0
    for i, layer in enumerate(fp.layers):
        split = 7  # two updates: the prefill and a continuation
        k1, v1 = cache.update(layer.keys[:, :, :split], layer.values[:, :, :split], i)
        k2, v2 = cache.update(layer.keys[:, :, split:], layer.values[:, :, split:], i)
        assert torch.equal(k2[:, :, :split], k1) and torch.equal(v2[:, :, :split], v1)
        assert torch.equal(torch.cat(cache.layers[i].dequantized(), -1), torch.cat([k2, v2], -1))
        for kind, x, x_hat in (("k", layer.keys, k2), ("v", layer.values, v2)):
            s, o = factors[f"model.layers.{i}.self_attn.{kind}_proj"]
            s = torch.tensor(s).view(1, heads, 1, dim)  # channel = head * head_dim + d
            o = torch.tensor(o, dtype=torch.float32).view(1, heads, 1, dim)
            lo, hi = (-128 - o) * s, (127 - o) * s
            inside = (x >= lo) & (x <= hi)
            err = (x_hat - x).abs()
            assert bool((err <= s / 2 * (1 + 1e-5) + 1e-7)[inside].all()), (i, kind)
            edge = torch.where(x > hi, hi, lo).expand_as(x)
            torch.testing.assert_close(x_hat[~inside], edge[~inside], atol=1e-6, rtol=1e-6)
            checked += int(inside.sum())
            clipped += int((~inside).sum())
    assert cache.layers[0].keys.dtype == torch.int8
    assert checked > 100 * clipped  # the bound was checked on (nearly) all values


@pytest.mark.parametrize("scale, offset, problem", [
    (float("nan"), 0, "scale"), (0.0, 0, "scale"), (-0.5, 0, "scale"), (float("inf"), 0, "scale"),
    (0.5, 1000, "offset"), (0.5, 2 ** 40, "offset"), (0.5, -129, "offset")])
def test_unusable_factors_are_refused_by_the_cache_and_by_eval(tmp_path, scale, offset, problem):
    """One validator wherever factors are read: the cache, the evaluator and
    the export reader refuse what the exporter refuses."""
    from amct_hf.errors import RecordFileError
    model = tiny("llama")
    factors = minmax_record(model, torch.randint(1, VOCAB, (1, 6)))
    s, o = factors["model.layers.1.self_attn.v_proj"]
    factors["model.layers.1.self_attn.v_proj"] = ([scale] + s[1:], [offset] + o[1:])
    match = rf"'model\.layers\.1\.self_attn\.v_proj' has unusable factors: {problem}\[0\]"
    with pytest.raises(RecordFileError, match=match):
        StaticInt8KVCache.from_record(factors, model)
    from amct_hf.evaluation.perplexity import evaluate_kv_quant
    with pytest.raises(RecordFileError, match=match):
        evaluate_kv_quant(model, ["a b c"], factors, tokenizer=object())
