"""amct_hf.evaluation.per_layer.per_layer_cost: the per-layer ranking checked against one-layer
evaluations written here (own fake quantization, own NLL), and the skip-layers file."""
import math
import re

import pytest
import torch
import torch.nn.functional as F

from amct_hf import calibrate_kv_cache, write_kv_factors
from amct_hf.cli import main
from amct_hf.data.samples import load_texts, tokenize_samples
from amct_hf.errors import InvalidArgumentError
from amct_hf.evaluation.per_layer import per_layer_cost, skip_layers_arg
from amct_hf.evaluation.per_layer import vllm_layer_index as layer_index
from amct_hf.modeling.attention import kv_transform

from ..conftest import corpus_lines, word_tokenizer

SEQ, N, LAYERS = 24, 4, 4
#: how much coarser than calibrated each layer's scales are: distinct costs per layer
COARSEN = (2.0, 9.0, 1.0, 5.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import transformers as tf

    d = tmp_path_factory.mktemp("tiny_per_layer")
    word_tokenizer().save_pretrained(d)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.15)
    tf.LlamaForCausalLM(cfg).eval().save_pretrained(d)
    (d / "corpus.txt").write_text("\n".join(corpus_lines(200)) + "\n")
    res = calibrate_kv_cache(str(d), str(d / "corpus.txt"), record_file=d / "unused.txt",
                             quant_algo_params={"quant_granularity": "per_tensor", "asymmetric": False},
                             num_samples=4, seq_len=16, mode="exact", progress=False, write=False)
    coarse = {}
    for name, (s, o) in res.factors.items():
        c = COARSEN[int(name.split(".")[2])]
        coarse[name] = ([v * c for v in s], o)
    write_kv_factors(d / "record.txt", coarse)
    return d, coarse


def one_layer_ppl(model, ids, factors, layer):
    """Perplexity with only ``model.layers.{layer}``'s K and V fake-quantized by hand."""
    prefix = f"model.layers.{layer}.self_attn."

    def fq(name, x):
        if not name.startswith(prefix):
            return x
        s, o = (torch.tensor(v, dtype=torch.float32) for v in factors[name])
        return ((torch.clamp(torch.round(x.float() / s) + o, -128, 127) - o) * s).to(x.dtype)

    with torch.no_grad(), kv_transform(model, fq):
        logits = model(input_ids=ids, use_cache=False).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), ids[:, 1:].reshape(-1),
                          reduction="sum")
    return math.exp(float(nll) / ids[:, 1:].numel())


def test_ranking_matches_one_layer_evaluations(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, factors = tiny
    model, tok = AutoModelForCausalLM.from_pretrained(d).eval(), AutoTokenizer.from_pretrained(d)
    forwards = []
    model.register_forward_pre_hook(lambda *a: forwards.append(1))
    result = per_layer_cost(model, str(d / "corpus.txt"), d / "record.txt", tokenizer=tok,
                            num_samples=N, seq_len=SEQ, batch_size=2)
    # one probe, one full-precision pass, then one pass per layer (2 batches each)
    assert len(forwards) == 1 + 2 * (1 + LAYERS)

    ids = torch.tensor(tokenize_samples(tok, load_texts(str(d / "corpus.txt")), seq_len=SEQ, num_samples=N))
    with torch.no_grad():
        base_logits = model(input_ids=ids, use_cache=False).logits
    base = math.exp(float(F.cross_entropy(base_logits[:, :-1].reshape(-1, 32).double(), ids[:, 1:].reshape(-1),
                                          reduction="sum")) / ids[:, 1:].numel())
    separate = {f"model.layers.{i}.self_attn": one_layer_ppl(model, ids, factors, i) for i in range(LAYERS)}
    assert len({round(v, 6) for v in separate.values()}) == LAYERS  # distinct costs: the order means something
    expected = sorted(separate, key=lambda p: -separate[p])

    assert [row["layer"] for row in result.layers] == expected
    assert result.baseline_ppl == pytest.approx(base, rel=1e-6)
    for row in result.layers:
        assert row["ppl"] == pytest.approx(separate[row["layer"]], rel=1e-6)
        assert row["relative_increase"] == pytest.approx(separate[row["layer"]] / base - 1, rel=1e-5, abs=1e-9)
        assert row["index"] == int(row["layer"].split(".")[2])
        assert row["interval"]["low"] <= row["relative_increase"] <= row["interval"]["high"]
    assert result.num_samples == N and result.num_tokens == N * (SEQ - 1)
    assert result.table().splitlines()[3].split()[1] == expected[0]


def test_skip_layers_format():
    rows = [{"layer": f"model.layers.{i}.self_attn", "index": i} for i in (11, 3, 7)]
    assert skip_layers_arg(rows) == "3 7 11"
    assert skip_layers_arg([]) == ""
    assert layer_index("model.layers.7.self_attn") == 7
    assert layer_index("model.language_model.layers.12.self_attn") == 12
    assert layer_index("transformer.blocks.attn") is None
    assert layer_index("model.0.layers.3.attn") is None
    with pytest.raises(InvalidArgumentError, match="no single layer index"):
        skip_layers_arg([{"layer": "transformer.blocks.attn", "index": None}])


def test_cli_per_layer_writes_skip_layers(tiny, tmp_path, capsys):
    d, factors = tiny
    out = tmp_path / "skip.txt"
    args = ["eval", "--model", str(d), "--dataset", str(d / "corpus.txt"), "--record", str(d / "record.txt"),
            "--num-samples", str(N), "--seq-len", str(SEQ), "--no-progress", "--per-layer"]
    assert main(args + ["--skip-layers", "2", "--skip-layers-out", str(out)]) == 0
    printed = capsys.readouterr().out
    ranked = re.findall(r"^\d+\s+model\.layers\.(\d+)\.self_attn", printed, flags=re.M)
    assert len(ranked) == LAYERS
    text = out.read_text()
    assert re.fullmatch(r"\d+( \d+)*\n", text)
    assert text == " ".join(sorted(ranked[:2], key=int)) + "\n"
    assert f"--kv-cache-dtype-skip-layers {text.strip()}" in printed

    assert main(["eval", "--model", str(d), "--record", str(d / "record.txt"),
                 "--skip-layers-out", str(out)]) == 2
    assert "--skip-layers-out needs --per-layer" in capsys.readouterr().err
