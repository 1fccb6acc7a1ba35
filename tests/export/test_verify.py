"""amct-hf verify: passes our own exports, and fails with one line naming the problem on
the breakages engines would serve silently (tiny Llama, so every export is small)."""
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from amct_hf.cli import main
from amct_hf.export import export_ascend_c8, export_lmdeploy_ascend, export_vllm_fp8
from amct_hf.export.modelopt import export_modelopt_fp8
from amct_hf.export.verify import verify_export
from amct_hf.modeling.layout import kv_layout
from amct_hf.record.files import write_kv_factors
from tests.tiny_models import build


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    model = build("llama")
    model.save_pretrained(root / "llama")
    layout = kv_layout(model)
    g = torch.Generator().manual_seed(0)
    factors = {n: ((torch.rand(s.channels, generator=g) * 0.02 + 0.005).tolist(), [0] * s.channels)
               for n, s in layout.items()}
    write_kv_factors(root / "rec.txt", factors)
    write_kv_factors(root / "pt.txt", {n: ([max(s)], [0]) for n, (s, _) in factors.items()})
    dirs = {}
    for fmt, run in (("ascend-c8", export_ascend_c8), ("vllm-fp8", export_vllm_fp8),
                     ("modelopt-fp8", export_modelopt_fp8)):
        run(root / "rec.txt", root / "llama", root / fmt)
        dirs[fmt] = root / fmt
    export_vllm_fp8(root / "rec.txt", root / "llama", root / "vllm-head", kv_strategy="attn_head")
    dirs["vllm-head"] = root / "vllm-head"
    export_lmdeploy_ascend(root / "pt.txt", root / "lmdeploy.txt")
    dirs["lmdeploy"] = root / "lmdeploy.txt"
    return root, dirs, len({n.rpartition(".")[0] for n in layout})


@pytest.mark.parametrize("fmt", ["ascend-c8", "vllm-fp8", "vllm-head", "modelopt-fp8", "lmdeploy"])
def test_our_exports_pass(tiny, fmt, capsys):
    root, dirs, layers = tiny
    report = verify_export(dirs[fmt], num_layers=layers if fmt == "lmdeploy" else None)
    assert report.ok, report.problems
    assert len(report.rows) == layers
    args = ["verify", str(dirs[fmt])] + (["--num-layers", str(layers)] if fmt == "lmdeploy" else [])
    assert main(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("OK: ") and len(out) == layers + 3


def _copy(tiny, fmt, tmp_path):
    src = tiny[1][fmt]
    dst = tmp_path / fmt
    shutil.copytree(src, dst)
    return dst


def _edit(d, index_name, edit):
    """Rewrite the shard(s) of ``d`` through ``edit(tensors) -> tensors`` and the index."""
    index_path = d / index_name
    index = json.loads(index_path.read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(d / shard)
        new = edit(dict(tensors))
        save_file(new, d / shard)
        for name in set(tensors) - set(new):
            del index["weight_map"][name]
    index_path.write_text(json.dumps(index))


def _fails(d, capsys, match):
    report = verify_export(d)
    assert not report.ok
    assert main(["verify", str(d)]) == 1
    verdict = capsys.readouterr().out.strip().splitlines()[-1]
    assert verdict.startswith("FAIL: ") and "\n" not in verdict
    assert match in verdict, verdict
    return verdict


def test_missing_layer_fails(tiny, tmp_path, capsys):
    d = _copy(tiny, "vllm-fp8", tmp_path)
    _edit(d, "model.safetensors.index.json",
          lambda t: {n: v for n, v in t.items() if n != "model.layers.1.self_attn.v_scale"})
    _fails(d, capsys, "layer 'model.layers.1.self_attn' has no v_scale")


def test_scale_one_everywhere_fails(tiny, tmp_path, capsys):
    d = _copy(tiny, "modelopt-fp8", tmp_path)
    _edit(d, "model.safetensors.index.json",
          lambda t: {n: torch.ones_like(v) if n.endswith(("k_scale", "v_scale")) else v for n, v in t.items()})
    _fails(d, capsys, "every KV scale is 1.0")


def test_nonzero_offset_where_ignored_fails(tiny, tmp_path, capsys):
    d = _copy(tiny, "ascend-c8", tmp_path)
    name = "model.layers.0.self_attn.v_proj.kv_cache_offset"

    def edit(t):
        if name in t:
            t[name] = torch.full_like(t[name], 3)
        return t
    _edit(d, "quant_model_weights.safetensors.index.json", edit)
    _fails(d, capsys, f"{name} holds the offset 3")


def test_wrong_shape_fails(tiny, tmp_path, capsys):
    d = _copy(tiny, "ascend-c8", tmp_path)
    name = "model.layers.0.self_attn.k_proj.kv_cache_scale"

    def edit(t):
        if name in t:
            t[name] = t[name][:1].clone()  # one element: breaks vllm-ascend's view
        return t
    _edit(d, "quant_model_weights.safetensors.index.json", edit)
    _fails(d, capsys, f"{name} has shape [1]")


def test_nan_scale_fails(tiny, tmp_path, capsys):
    d = _copy(tiny, "vllm-head", tmp_path)
    name = "model.layers.1.self_attn.k_scale"

    def edit(t):
        if name in t:
            t[name] = t[name].clone()
            t[name][0] = math.nan
        return t
    _edit(d, "model.safetensors.index.json", edit)
    _fails(d, capsys, f"{name} has the scale nan")


def test_lmdeploy_record_with_wrong_layer_count_fails(tiny, capsys):
    root, dirs, layers = tiny
    report = verify_export(dirs["lmdeploy"], num_layers=layers + 1)
    assert not report.ok and f"for a {layers + 1}-layer model" in report.verdict()
