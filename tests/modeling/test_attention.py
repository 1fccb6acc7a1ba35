import pytest
import torch
from torch import nn

from amct_hf import QuantCalibrationOp, read_kv_factors
from amct_hf.errors import UnpatchableModelError
from amct_hf.modeling.attention import kv_calibration, kv_transform

from ..tiny_models import KINDS, VOCAB, build


class Collect:
    def __init__(self):
        self.data = {}

    def __call__(self, name, x):
        self.data.setdefault(name, []).append(x.detach().clone())

    def cat(self, name):
        return torch.cat(self.data[name])


def ids(b=2, s=12, seed=1):
    return torch.randint(1, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


def kv_channels(model):
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_key_value_heads * head_dim


@pytest.mark.parametrize("kind", KINDS)
def test_complete_record_with_module_path_names(kind, tmp_path):
    model = build(kind)
    record = tmp_path / "kv.txt"
    op = QuantCalibrationOp(str(record), {"quant_granularity": "per_channel"})
    with kv_calibration(model, op):
        model(ids())
    got = read_kv_factors(record)
    n = model.config.num_hidden_layers
    assert sorted(got) == sorted(f"model.layers.{i}.self_attn.{p}_proj" for i in range(n) for p in "kv")
    assert {len(s) for s, _ in got.values()} == {kv_channels(model)}


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_channel_order_is_k_proj_order_at_position_zero(kind):
    # RoPE is the identity at position 0, so the cache's key there is the k_proj output
    model = build(kind)
    seen, proj = Collect(), {}
    x = ids(b=3, s=5)
    k_proj = model.model.layers[1].self_attn.k_proj
    handle = k_proj.register_forward_hook(lambda m, a, out: proj.setdefault("k", out.detach().clone()))
    with kv_calibration(model, seen):
        model(x)
    handle.remove()
    keys = seen.cat("model.layers.1.self_attn.k_proj").reshape(3, 5, -1)  # [B, S, heads*dim]
    assert torch.allclose(keys[:, 0], proj["k"][:, 0], atol=1e-6)
    assert not torch.allclose(keys[:, 1], proj["k"][:, 1], atol=1e-3)  # RoPE acts after position 0


def test_keys_are_after_k_norm_for_qwen3():
    model = build("qwen3")
    seen, proj = Collect(), {}
    attn = model.model.layers[0].self_attn
    handle = attn.k_proj.register_forward_hook(lambda m, a, out: proj.setdefault("k", out.detach().clone()))
    with kv_calibration(model, seen):
        model(ids(b=1, s=4))
    handle.remove()
    key0 = seen.cat("model.layers.0.self_attn.k_proj")[0].reshape(2, 16)
    normed = attn.k_norm(proj["k"][0, 0].reshape(2, 16))
    assert torch.allclose(key0, normed, atol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_outputs_identical_while_calibrating_and_after_and_install_is_idempotent(kind, tmp_path):
    model = build(kind)
    x = ids()
    before = model(x).logits
    impl = model.config._attn_implementation
    op = QuantCalibrationOp(str(tmp_path / "kv.txt"), {"batch_num": 2})
    with kv_calibration(model, op) as outer:
        with kv_calibration(model, op):  # applying it twice changes nothing
            during = model(x).logits
            assert len(outer.seen) == 2 * model.config.num_hidden_layers
        assert model.config._attn_implementation != impl  # still installed: outer context open
        again = model(x).logits
    after = model(x).logits
    assert model.config._attn_implementation == impl
    assert torch.equal(before, during) and torch.equal(before, again) and torch.equal(before, after)
    # two forwards, batch_num=2: every layer finalised exactly once
    assert len(read_kv_factors(tmp_path / "kv.txt")) == 2 * model.config.num_hidden_layers
    assert not any("_amct_hf_kv_state" in m.__dict__ for m in model.modules())


def test_second_observer_on_same_model_is_refused(tmp_path):
    model = build("llama")
    with kv_calibration(model, Collect()):
        with pytest.raises(RuntimeError, match="already being calibrated"):
            with kv_calibration(model, Collect()):
                pass


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_never_enters_statistics(side):
    model = build("llama")
    lengths = [9, 5, 7]
    texts = [ids(b=1, s=n, seed=10 + n)[0] for n in lengths]
    plain = Collect()
    with kv_calibration(model, plain):
        for t in texts:
            model(t[None])
    width = max(lengths)
    batch = torch.zeros(len(texts), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, t in enumerate(texts):
        sl = slice(width - len(t), width) if side == "left" else slice(0, len(t))
        batch[i, sl], mask[i, sl] = t, 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    padded = Collect()
    with kv_calibration(model, padded):
        model(input_ids=batch, attention_mask=mask, position_ids=position_ids)
    for name in plain.data:
        a, b = plain.cat(name), padded.cat(name)
        assert a.shape == b.shape == (sum(lengths), kv_channels(model))
        # same rows (token order within the batch follows the padding layout)
        assert torch.allclose(a.sort(0).values, b.sort(0).values, atol=1e-5)


def test_proj_tap_equals_op_on_projection_outputs(tmp_path):
    model = build("llama")
    x = ids(b=2, s=10)
    params = {"quant_granularity": 1}
    op = QuantCalibrationOp(str(tmp_path / "tap.txt"), params)
    with kv_calibration(model, op, tap="proj"):
        model(x)
    direct = QuantCalibrationOp(str(tmp_path / "direct.txt"), params)
    handles = []
    for i, layer in enumerate(model.model.layers):
        for p in "kv":
            name = f"model.layers.{i}.self_attn.{p}_proj"
            handles.append(getattr(layer.self_attn, f"{p}_proj").register_forward_hook(
                lambda m, a, out, name=name: direct(name, out)))
    model(x)
    for h in handles:
        h.remove()
    assert read_kv_factors(tmp_path / "tap.txt") == read_kv_factors(tmp_path / "direct.txt")
    assert len(read_kv_factors(tmp_path / "tap.txt")) == 4


def test_fused_qkv_layout_gets_two_entries_per_attention_module(tmp_path):
    model = build("phi3")
    seen = Collect()
    with kv_calibration(model, seen):
        model(ids())
    assert sorted(seen.data) == sorted(f"model.layers.{i}.self_attn.{k}_states"
                                       for i in range(2) for k in ("key", "value"))
    with pytest.raises(UnpatchableModelError, match="k_proj"):
        with kv_calibration(model, seen, tap="proj"):
            pass


def test_unpatchable_model_is_named():
    class Plain(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(UnpatchableModelError, match="Plain"):
        with kv_calibration(Plain(), Collect()):
            pass


def test_with_cache_only_new_tokens_are_observed():
    model = build("llama")
    seen = Collect()
    prompt = ids(b=1, s=6)
    with kv_calibration(model, seen):
        model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    # 6 prompt tokens, then one new token for each of the 3 further steps
    assert seen.cat("model.layers.0.self_attn.k_proj").shape[0] == 6 + 3


def test_kv_transform_changes_attention_inputs():
    model = build("llama")
    x = ids()
    base = model(x).logits
    with kv_transform(model, lambda name, s: s * 0 if name.endswith("v_proj") else s):
        zeroed = model(x).logits
    assert not torch.allclose(base, zeroed)
    assert torch.equal(model(x).logits, base)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tap", ["cache", "proj"])
def test_stop_when_complete_skips_the_tail_and_observes_the_same(kind, tap):
    from amct_hf.modeling.attention import KVCalibrationHooks, KVStatesComplete

    model = build(kind)
    full, stopped = Collect(), Collect()
    batches = [ids(seed=s) for s in (1, 2, 3)]
    with torch.no_grad(), KVCalibrationHooks(model, full, tap=tap):
        for x in batches:
            model(x)
    last_layer = model.model.layers[-1]
    tail_calls = []
    handles = [last_layer.mlp.register_forward_hook(lambda *a: tail_calls.append("mlp")),
               model.model.norm.register_forward_hook(lambda *a: tail_calls.append("norm"))]
    raised = 0
    with torch.no_grad(), KVCalibrationHooks(model, stopped, tap=tap, stop_when_complete=True):
        for x in batches:
            try:
                model(x)
            except KVStatesComplete:
                raised += 1
    for h in handles:
        h.remove()
    assert raised == 2 and tail_calls == ["mlp", "norm"]  # only the first forward ran whole
    assert list(stopped.data) == list(full.data)
    for name in full.data:
        assert torch.equal(stopped.cat(name), full.cat(name)), name
    model(batches[0])  # the hooks are gone: nothing raises after exit


def test_stop_when_complete_counts_a_module_that_runs_twice_per_forward():
    """A block shared between depths (layer 0 runs again at the end) hands over the same keys
    twice per forward: the stop comes after as many hand-overs as the first forward made,
    not at the first repeat of the last key."""
    from amct_hf.modeling.attention import KVCalibrationHooks, KVStatesComplete

    model = build("llama")
    layers = model.model.layers
    model.model.layers = nn.ModuleList([layers[0], layers[1], layers[0]])
    model.config.num_hidden_layers = 3
    full, stopped = Collect(), Collect()
    batches = [ids(seed=s) for s in (1, 2, 3)]
    with torch.no_grad(), KVCalibrationHooks(model, full):
        for x in batches:
            model(x)
    with torch.no_grad(), KVCalibrationHooks(model, stopped, stop_when_complete=True):
        for x in batches:
            try:
                model(x)
            except KVStatesComplete:
                pass
    assert len(full.data["model.layers.0.self_attn.k_proj"]) == 6  # twice per forward
    for name in full.data:
        assert torch.equal(stopped.cat(name), full.cat(name)), name


def test_nested_hooks_with_another_stop_setting_refused():
    from amct_hf.modeling.attention import KVCalibrationHooks

    model = build("llama")
    sink = Collect()
    with KVCalibrationHooks(model, sink):
        with pytest.raises(RuntimeError, match="stop_when_complete"):
            with KVCalibrationHooks(model, sink, stop_when_complete=True):
                pass
