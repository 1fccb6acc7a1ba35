"""amct_hf.evaluation.perplexity: perplexities checked against an independent, hand-written forward.

The tiny Llama is run by hand (embedding, RMSNorm, RoPE, GQA eager attention, SwiGLU MLP)
with its own fake-quant of K/V, its own chunking of the packed token stream and its own
NLL, and compared with what the evaluator gets through the attention hooks.
"""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from amct_hf import calibrate_kv_cache, write_kv_factors
from amct_hf.cli import main
from amct_hf.data.samples import load_texts, tokenize_samples
from amct_hf.errors import RecordMismatchError
from amct_hf.evaluation.perplexity import evaluate_kv_quant

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon phi chi psi omega").split()
SEQ, N = 24, 4  # evaluation chunks


def corpus_lines(n=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(k),), generator=g))
            for k in torch.randint(3, 30, (n,), generator=g)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama (GQA: 4 heads, 2 KV heads) saved with a word-level tokenizer, a corpus,
    and a per-channel and a per-tensor record calibrated on it, with scales made 6x
    coarser so that quantization visibly moves the perplexity."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("tiny_eval")
    tk = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(corpus_lines(), trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "[EOS]"]))
    tf.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]",
                               eos_token="[EOS]").save_pretrained(d)
    torch.manual_seed(0)
    # a large init makes attention peaky, so key quantization matters too
    cfg = tf.LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.15)
    tf.LlamaForCausalLM(cfg).eval().save_pretrained(d)
    (d / "corpus.txt").write_text("\n".join(corpus_lines()) + "\n")
    records = {}
    for gran in ("per_channel", "per_tensor"):
        res = calibrate_kv_cache(str(d), str(d / "corpus.txt"), record_file=d / f"cal_{gran}.txt",
                                 quant_algo_params={"quant_granularity": gran}, num_samples=4,
                                 seq_len=16, mode="exact", progress=False, write=False)
        coarse = {n: ([s * 6 for s in sc], [max(-128, min(127, round(o / 6) + 110)) for o in of])
                  for n, (sc, of) in res.factors.items()}
        records[gran] = d / f"{gran}.txt"
        write_kv_factors(records[gran], coarse)
    return d, records


def load(d):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return AutoModelForCausalLM.from_pretrained(d).eval(), AutoTokenizer.from_pretrained(d)


def chunks(d, tok, skip=0):
    samples = tokenize_samples(tok, load_texts(str(d / "corpus.txt")), seq_len=SEQ, num_samples=skip + N)
    return torch.tensor(samples[skip:], dtype=torch.long)


# --------------------------------------------------------------------------- the reference

def fq_static(factors):
    """Hand-written SPEC §3 quantize-dequantize with a record's factors."""
    def fq(name, x):  # x: [B, kv_heads, S, head_dim]
        s, o = factors[name]
        s, o = torch.tensor(s, dtype=torch.float32), torch.tensor(o, dtype=torch.float32)
        if s.numel() > 1:  # channel c = head * head_dim + d
            s, o = s.view(x.shape[1], 1, x.shape[3]), o.view(x.shape[1], 1, x.shape[3])
        q = torch.clamp(torch.round(x / s) + o, -128, 127)
        return (q - o) * s
    return fq


def fq_dynamic(name, x):
    """Asymmetric min-max per token and head, range including 0."""
    hi = x.max(dim=-1, keepdim=True).values.clamp(min=0)
    lo = x.min(dim=-1, keepdim=True).values.clamp(max=0)
    s = (hi - lo) / 255
    o = torch.round(-128 - lo / s)
    return (torch.clamp(torch.round(x / s) + o, -128, 127) - o) * s


@torch.no_grad()
def manual_forward(model, ids, fq=None):
    """(summed NLL, predicted tokens, {record key: [err, ref]}) of a by-hand Llama forward
    with ``fq(record key, states)`` applied to post-RoPE keys and values."""
    c, m = model.config, model.model
    b, s = ids.shape
    h, kv = c.num_attention_heads, c.num_key_value_heads
    d = c.hidden_size // h
    inv = 1.0 / (c.rope_parameters["rope_theta"] ** (torch.arange(0, d, 2).float() / d))
    ang = torch.arange(s).float()[:, None] * inv[None, :]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps))

    def rope(x):
        return x * cos + torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1) * sin

    causal = torch.full((s, s), float("-inf")).triu(1)
    errors = {}
    x = m.embed_tokens.weight[ids]
    for i, layer in enumerate(m.layers):
        a = layer.self_attn
        y = rms(x, layer.input_layernorm.weight)
        q = rope((y @ a.q_proj.weight.T).view(b, s, h, d).transpose(1, 2))
        k = rope((y @ a.k_proj.weight.T).view(b, s, kv, d).transpose(1, 2))
        v = (y @ a.v_proj.weight.T).view(b, s, kv, d).transpose(1, 2)
        if fq is not None:
            for name, t in ((f"model.layers.{i}.self_attn.k_proj", k), (f"model.layers.{i}.self_attn.v_proj", v)):
                t_hat = fq(name, t)
                e = errors.setdefault(name, [0.0, 0.0])
                e[0] += float(((t_hat - t) ** 2).sum())
                e[1] += float((t ** 2).sum())
                t.copy_(t_hat)
        k, v = k.repeat_interleave(h // kv, 1), v.repeat_interleave(h // kv, 1)
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + causal, dim=-1)
        x = x + (w @ v).transpose(1, 2).reshape(b, s, h * d) @ a.o_proj.weight.T
        y = rms(x, layer.post_attention_layernorm.weight)
        mlp = layer.mlp
        x = x + (F.silu(y @ mlp.gate_proj.weight.T) * (y @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    logits = rms(x, m.norm.weight) @ model.lm_head.weight.T
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
    return float(nll), ids[:, 1:].numel(), errors


# --------------------------------------------------------------------------- tests

@pytest.mark.parametrize("gran", ["per_channel", "per_tensor"])
def test_quantized_ppl_equals_hand_written_fake_quant_forward(tiny, gran):
    from amct_hf import read_kv_factors
    d, records = tiny
    model, tok = load(d)
    res = evaluate_kv_quant(model, str(d / "corpus.txt"), records[gran], tokenizer=tok,
                            num_samples=N, seq_len=SEQ, batch_size=3, skip_tokens=20)
    ids = chunks(d, tok, skip=1)  # 20 tokens round up to one whole chunk
    assert res.num_samples == N and res.num_tokens == N * (SEQ - 1) and res.granularity == gran

    factors = read_kv_factors(records[gran])
    base_nll, count, _ = manual_forward(model, ids)
    q_nll, _, errors = manual_forward(model, ids, fq_static(factors))
    dyn_nll, _, dyn_errors = manual_forward(model, ids, fq_dynamic)
    assert res.baseline_ppl == pytest.approx(math.exp(base_nll / count), rel=1e-5)
    assert res.quantized_ppl == pytest.approx(math.exp(q_nll / count), rel=1e-5)
    assert res.references["dynamic_per_token"]["ppl"] == pytest.approx(math.exp(dyn_nll / count), rel=1e-5)
    # the comparison means something: the record's quantization moves the perplexity
    assert abs(res.relative_increase) > 1e-3
    assert res.relative_increase == pytest.approx(res.quantized_ppl / res.baseline_ppl - 1)
    for name, (err, ref) in errors.items():
        assert res.layers[name]["rel_mse"] == pytest.approx(err / ref, rel=1e-4), name
        assert res.layers[name]["rel_mse_dynamic_per_token"] == pytest.approx(
            dyn_errors[name][0] / dyn_errors[name][1], rel=1e-4), name
        assert 0 < res.layers[name]["clip_fraction"] < 1 and res.layers[name]["channels"] == 32
    assert "model.layers.1.self_attn" in res.table()


def test_chunk_nlls_and_interval_follow_the_hand_written_forward(tiny):
    from amct_hf import read_kv_factors
    from amct_hf.evaluation.intervals import paired_relative_increase
    d, records = tiny
    model, tok = load(d)
    res = evaluate_kv_quant(model, str(d / "corpus.txt"), records["per_channel"], tokenizer=tok,
                            num_samples=N, seq_len=SEQ, batch_size=3, references=False)
    ids = chunks(d, tok)
    fq = fq_static(read_kv_factors(records["per_channel"]))
    base = [manual_forward(model, ids[i:i + 1])[0] for i in range(N)]
    quant = [manual_forward(model, ids[i:i + 1], fq)[0] for i in range(N)]
    assert res.baseline_chunk_nll == pytest.approx(base, rel=1e-5)
    assert res.quantized_chunk_nll == pytest.approx(quant, rel=1e-5)
    assert res.chunk_tokens == [SEQ - 1] * N
    want = paired_relative_increase(base, quant, SEQ - 1)
    assert res.interval["point"] == pytest.approx(res.relative_increase, rel=1e-9)
    assert res.interval["low"] == pytest.approx(want.low, rel=1e-4)
    assert res.interval["high"] == pytest.approx(want.high, rel=1e-4)
    assert res.interval["low"] < res.interval["high"] and res.interval["chunks"] == N
    assert "95% interval" in res.table()


def test_reused_baseline_gives_the_same_result_and_must_match_the_chunks(tiny):
    d, records = tiny
    model, tok = load(d)
    kw = dict(tokenizer=tok, num_samples=N, seq_len=SEQ, references=False)
    first = evaluate_kv_quant(model, str(d / "corpus.txt"), records["per_tensor"], **kw)
    fresh = evaluate_kv_quant(model, str(d / "corpus.txt"), records["per_channel"], **kw)
    reused = evaluate_kv_quant(model, str(d / "corpus.txt"), records["per_channel"], baseline=first, **kw)
    assert reused.baseline_chunk_nll == fresh.baseline_chunk_nll
    assert reused.quantized_ppl == fresh.quantized_ppl and reused.interval == fresh.interval
    with pytest.raises(ValueError, match="same evaluation chunks"):
        evaluate_kv_quant(model, str(d / "corpus.txt"), records["per_channel"], baseline=first,
                          **{**kw, "seq_len": SEQ - 1})
    with pytest.raises(ValueError, match="references=False"):
        evaluate_kv_quant(model, str(d / "corpus.txt"), records["per_channel"], baseline=first,
                          **{**kw, "references": True})


def test_minmax_reference_equals_a_record_of_min_max_factors(tiny, tmp_path):
    """The min-max reference = the record path fed min-max factors taken by hand over the
    evaluation chunks' K/V (same granularity as the record)."""
    from amct_hf.modeling.attention import kv_calibration
    d, records = tiny
    model, tok = load(d)
    ranges = {}

    def observe(name, x):
        lo, hi = x.min(0).values, x.max(0).values
        if name in ranges:
            lo, hi = torch.minimum(lo, ranges[name][0]), torch.maximum(hi, ranges[name][1])
        ranges[name] = (lo, hi)

    with torch.no_grad(), kv_calibration(model, observe):
        model(input_ids=chunks(d, tok), use_cache=False)
    mm = {}
    for name, (lo, hi) in ranges.items():
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        s = (hi - lo) / 255
        mm[name] = (s.tolist(), [int(v) for v in torch.round(-128 - lo / s)])
    write_kv_factors(tmp_path / "mm.txt", mm)
    res = evaluate_kv_quant(model, str(d / "corpus.txt"), records["per_channel"], tokenizer=tok,
                            num_samples=N, seq_len=SEQ, batch_size=2)
    as_record = evaluate_kv_quant(model, str(d / "corpus.txt"), tmp_path / "mm.txt", tokenizer=tok,
                                  num_samples=N, seq_len=SEQ, references=False)
    assert res.references["minmax"]["ppl"] == pytest.approx(as_record.quantized_ppl, rel=1e-5)
    assert as_record.references == {}
    # layer 0 sees the data the factors were taken on: at most rounding at the range ends
    # clips (later layers see states already changed by the quantization before them)
    for kind in "kv":
        assert as_record.layers[f"model.layers.0.self_attn.{kind}_proj"]["clip_fraction"] < 1e-3


def test_baseline_ppl_is_exp_of_mean_model_loss(tiny):
    d, records = tiny
    model, tok = load(d)
    res = evaluate_kv_quant(model, str(d / "corpus.txt"), records["per_tensor"], tokenizer=tok,
                            num_samples=N, seq_len=SEQ, references=False)
    ids = chunks(d, tok)
    with torch.no_grad():
        losses = [float(model(input_ids=row[None], labels=row[None]).loss) for row in ids]
    assert res.baseline_ppl == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-6)


def _forward_lengths(model):
    seen = []
    model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["input_ids"].shape[-1]), with_kwargs=True)
    return seen


@pytest.mark.parametrize("case", ["name", "channels", "missing", "extra"])
def test_mismatching_record_is_refused_before_any_evaluation_pass(tiny, tmp_path, case):
    from amct_hf import read_kv_factors
    d, records = tiny
    model, tok = load(d)
    good = read_kv_factors(records["per_channel"])
    bad = dict(good)
    if case == "name":  # a typo in layer 1's key name
        bad["model.layers.1.self_attn.kproj"] = bad.pop("model.layers.1.self_attn.k_proj")
        first = "'model.layers.1.self_attn.k_proj'"
    elif case == "channels":  # e.g. a record of a model with 1 KV head; layer 1 v first wrong
        s, o = bad["model.layers.1.self_attn.v_proj"]
        bad["model.layers.1.self_attn.v_proj"] = (s[:16], o[:16])
        s, o = bad["model.layers.1.self_attn.k_proj"]
        bad["model.layers.1.self_attn.k_proj"] = (s[:2], o[:2])
        first = "'model.layers.1.self_attn.k_proj' has 2 scales"
    elif case == "missing":
        del bad["model.layers.0.self_attn.v_proj"]
        first = "'model.layers.0.self_attn.v_proj' is not in the record"
    else:
        bad["model.layers.2.self_attn.k_proj"] = good["model.layers.0.self_attn.k_proj"]
        first = "'model.layers.2.self_attn.k_proj' is in the record"
    write_kv_factors(tmp_path / "bad.txt", bad)
    lengths = _forward_lengths(model)
    with pytest.raises(RecordMismatchError, match=first.replace("(", r"\(")) as err:
        evaluate_kv_quant(model, str(d / "corpus.txt"), tmp_path / "bad.txt", tokenizer=tok,
                          num_samples=N, seq_len=SEQ)
    assert "bad.txt" in str(err.value)
    assert lengths == [2]  # only the layout probe ran


def test_cli_eval_writes_json(tiny, tmp_path, capsys):
    d, records = tiny
    out = tmp_path / "eval.json"
    rc = main(["eval", "--model", str(d), "--dataset", str(d / "corpus.txt"), "--record",
               str(records["per_channel"]), "--json", str(out), "--num-samples", "2", "--seq-len", "16"])
    assert rc == 0
    data = json.loads(out.read_text())
    for key in ("baseline_ppl", "quantized_ppl", "relative_increase", "references", "layers"):
        assert key in data
    assert set(data["references"]) == {"minmax", "dynamic_per_token"}
    assert all(set(r) == {"ppl", "relative_increase", "interval"} for r in data["references"].values())
    assert data["interval"]["low"] <= data["relative_increase"] <= data["interval"]["high"]
    assert len(data["layers"]) == 4 and all("rel_mse" in v for v in data["layers"].values())
    assert data["relative_increase"] == pytest.approx(data["quantized_ppl"] / data["baseline_ppl"] - 1)
    text = capsys.readouterr().out
    assert "full precision" in text and "dynamic per-token" in text and "model.layers.0.self_attn" in text


def test_cli_eval_mismatch_is_one_line_error(tiny, tmp_path, capsys):
    d, _ = tiny
    write_kv_factors(tmp_path / "r.txt", {"model.layers.0.self_attn.k_proj": ([0.1], [0])})
    rc = main(["eval", "--model", str(d), "--dataset", str(d / "corpus.txt"), "--record",
               str(tmp_path / "r.txt"), "--num-samples", "1", "--seq-len", "8"])
    assert rc == 2
    assert "model.layers.0.self_attn.v_proj" in capsys.readouterr().err


def test_bad_arguments(tiny, tmp_path):
    d, records = tiny
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        evaluate_kv_quant(str(d), str(d / "corpus.txt"), tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="skip_tokens"):
        evaluate_kv_quant(str(d), str(d / "corpus.txt"), records["per_tensor"], skip_tokens=10 ** 7,
                          seq_len=SEQ)
    with pytest.raises(ValueError, match="seq_len"):
        evaluate_kv_quant(str(d), str(d / "corpus.txt"), records["per_tensor"], seq_len=1)


def test_a_nan_model_is_an_error_and_writes_no_json(tiny, tmp_path, capsys):
    d, records = tiny
    model, tok = load(d)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    broken = tmp_path / "nan_model"
    model.save_pretrained(broken)
    tok.save_pretrained(broken)
    out = tmp_path / "eval.json"
    capsys.readouterr()
    rc = main(["eval", "--model", str(broken), "--dataset", str(d / "corpus.txt"), "--record",
               str(records["per_tensor"]), "--json", str(out), "--num-samples", "1", "--seq-len", "16",
               "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not out.exists()
    assert len(err) == 1 and "perplexity is nan" in err[0]


def test_cli_eval_bad_dtype_is_a_usage_error(tiny, capsys):
    d, records = tiny
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--model", str(d), "--record", str(records["per_tensor"]), "--dtype", "float13"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--dtype: invalid choice: 'float13'" in err and "Traceback" not in err
