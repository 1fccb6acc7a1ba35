"""Calibrated vLLM query scales (tiny Llama): what is observed is the post-RoPE query the
attention receives, written as <attn>.q_scale, and used by eval --export --fp8-query."""
import json

import pytest
import torch

from amct_hf.evaluation.perplexity import evaluate_kv_quant
from amct_hf.evaluation.served import read_served_export
from amct_hf.export import export_vllm_fp8
from amct_hf.export.query import calibrate_query_scales
from amct_hf.export.verify import verify_export
from amct_hf.modeling.layout import kv_layout
from amct_hf.record.files import write_kv_factors
from tests.conftest import WORDS

TEXT = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(400)) for i in range(4)]


@pytest.fixture(scope="module")
def tiny(tiny_dir, tmp_path_factory):
    from amct_hf.modeling.loading import load_model

    root = tmp_path_factory.mktemp("query")
    (root / "llama").symlink_to(tiny_dir)
    model, _ = load_model(str(tiny_dir))
    layout = kv_layout(model)
    write_kv_factors(root / "rec.txt", {n: ([0.02] * s.channels, [0] * s.channels) for n, s in layout.items()})
    return root, model


def _qproj_hooks(model, store):
    return [m.self_attn.q_proj.register_forward_hook(
        lambda mod, a, out, i=i: store.setdefault(i, []).append(out.detach()))
        for i, m in enumerate(model.model.layers)]


def test_query_scales_bound_the_post_rope_query(tiny):
    root, model = tiny
    qproj = {}
    scales = calibrate_query_scales(str(root / "llama"), TEXT, num_samples=2, seq_len=64)
    # the same text through the saved model again, to bound what the hook must have seen
    from amct_hf.data.samples import tokenize_samples
    from amct_hf.modeling.loading import load_model
    loaded, tok = load_model(str(root / "llama"))
    handles = _qproj_hooks(loaded, qproj)
    with torch.no_grad():
        for s in tokenize_samples(tok, TEXT, seq_len=64, num_samples=2):
            loaded(input_ids=torch.tensor([s]))
    for h in handles:
        h.remove()
    head_dim = loaded.config.hidden_size // loaded.config.num_attention_heads
    assert len(scales) == loaded.config.num_hidden_layers
    for i, outs in qproj.items():
        heads = loaded.config.num_attention_heads
        q = torch.cat([o.reshape(-1, o.shape[-1]) for o in outs]).reshape(-1, heads, head_dim)
        half = head_dim // 2
        pair_norm = (q[..., :half] ** 2 + q[..., half:] ** 2).sqrt().max()  # RoPE rotates these pairs
        (s,) = scales[f"model.layers.{i}.self_attn"]
        amax = s * 448.0
        assert float(q.abs().max()) / 2 ** 0.5 - 1e-5 <= amax <= float(pair_norm) + 1e-5


def test_q_scale_written_read_and_served(tiny, tmp_path):
    root, _ = tiny
    scales = calibrate_query_scales(str(root / "llama"), TEXT, num_samples=2, seq_len=64)
    out = tmp_path / "vllm"
    export_vllm_fp8(root / "rec.txt", root / "llama", out, query_scales=scales)
    assert verify_export(out).ok
    served = read_served_export(out, torch.float32)
    for path, (s,) in scales.items():
        assert float(served.scales[(path, "query")]) == pytest.approx(s, rel=1e-6)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["kv_cache_scheme"]["strategy"] == "tensor"
    plain = evaluate_kv_quant(None, TEXT, export_dir=out, num_samples=2, seq_len=64, references=False)
    with_q = evaluate_kv_quant(None, TEXT, export_dir=out, num_samples=2, seq_len=64, references=False,
                               fp8_query=True)
    assert with_q.baseline_ppl == plain.baseline_ppl
    assert with_q.quantized_ppl != plain.quantized_ppl  # the query's FP8 rounding is simulated
    assert with_q.meta["fp8_query"] and "query FP8" in with_q.table()


def test_fp8_query_refused_for_int8_exports(tiny, tmp_path):
    from amct_hf.errors import ExportError
    from amct_hf.export import export_ascend_c8
    root, _ = tiny
    export_ascend_c8(root / "rec.txt", root / "llama", tmp_path / "a")
    with pytest.raises(ExportError, match="leaves the query unquantized"):
        evaluate_kv_quant(None, TEXT, export_dir=tmp_path / "a", num_samples=1, seq_len=32, fp8_query=True)


def test_cli_eval_export_prints_the_served_rows(tiny, tiny_dir, tmp_path, capsys):
    from amct_hf.cli import main
    root, _ = tiny
    export_vllm_fp8(root / "rec.txt", root / "llama", tmp_path / "v")
    corpus = str(tiny_dir / "corpus.txt")
    assert main(["eval", "--export", str(tmp_path / "v"), "--dataset", corpus, "--num-samples", "2",
                 "--seq-len", "16", "--no-progress", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    for row in ("as served by vllm-fp8 (FP8 E4M3, per_tensor)", "FP8 E4M3, scale 1.0 (uncalibrated)",
                "dynamic per-token INT8"):
        assert row in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["export_format"] == "vllm-fp8" and set(data["references"]) == {"fp8_scale_1", "dynamic_per_token"}
    assert main(["eval", "--export", str(tmp_path / "v"), "--model", str(tiny_dir), "--dataset", corpus]) == 2
    assert "--export evaluates the export's own model" in capsys.readouterr().err
