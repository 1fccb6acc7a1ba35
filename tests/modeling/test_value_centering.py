"""The identity a symmetric-only engine would rely on to serve an asymmetric value record
(docs/accuracy.md): attention weights sum to one, so quantizing ``v - mu``
symmetrically, with ``mu = -offset * scale`` moved into a ``v_proj`` bias and
``W_o @ repeat_kv(mu)`` into an ``o_proj`` bias, gives the logits of quantizing ``v``
with the asymmetric (scale, offset). Checked through the real routed attention
(:func:`kv_transform`) on a tiny Llama whose config carries attention biases, with the
biases from :func:`centering_biases`."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from amct_hf.algorithms.convention import fake_quantize
from amct_hf.modeling.attention import kv_transform
from amct_hf.modeling.centering import centering_biases, supports_value_centering
from amct_hf.naming import layer_kind

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16


def _config(bias: bool) -> LlamaConfig:
    return LlamaConfig(vocab_size=128, hidden_size=HEADS * HEAD_DIM, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, attention_bias=bias)


def _values_only(factors):
    def transform(name, states):
        if layer_kind(name) != "value":
            return states
        scale, offset = factors[int(name.split(".")[2])]
        return fake_quantize(states, scale, offset)
    return transform


def test_value_offsets_fold_into_attention_biases_exactly():
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config(False)).eval()
    ids = torch.randint(0, 128, (2, 24))
    # per-channel asymmetric value factors, broadcast over [batch, kv_heads, seq, head_dim]:
    # offset -100 puts the range at [-28 s, 227 s] with s = max|v| / 60, so the asymmetric
    # record clips negative values that a symmetric one with the same scale keeps
    shape = (1, KV_HEADS, 1, HEAD_DIM)
    peak = {}

    def record_peak(name, states):
        if layer_kind(name) == "value":
            peak[int(name.split(".")[2])] = states.abs().amax(dim=(0, 2), keepdim=True)
        return states
    with torch.no_grad(), kv_transform(model, record_peak):
        model(ids)
    scales = {i: peak[i] / 60 for i in range(2)}
    offsets = {i: torch.full(shape, -100.0) for i in range(2)}
    assert supports_value_centering(model.config)
    folded = LlamaForCausalLM(_config(True)).eval()
    state = dict(model.state_dict())
    for i, layer in enumerate(model.model.layers):
        mu = (-offsets[i] * scales[i]).reshape(-1)
        v_delta, o_delta = centering_biases(mu, layer.self_attn.o_proj.weight, HEADS)
        prefix = f"model.layers.{i}.self_attn."
        state[prefix + "q_proj.bias"] = torch.zeros(HEADS * HEAD_DIM)
        state[prefix + "k_proj.bias"] = torch.zeros(KV_HEADS * HEAD_DIM)
        state[prefix + "v_proj.bias"] = v_delta.float()
        state[prefix + "o_proj.bias"] = o_delta.float()
    folded.load_state_dict(state)
    with torch.no_grad():
        plain = model(ids).logits
        with kv_transform(model, _values_only({i: (scales[i], offsets[i]) for i in range(2)})):
            asymmetric = model(ids).logits
        with kv_transform(folded, _values_only({i: (scales[i], torch.zeros(shape)) for i in range(2)})):
            symmetric_folded = folded(ids).logits
    quantization_effect = (asymmetric - plain).abs().max()
    assert quantization_effect > 1e-3  # the comparison below is not vacuous
    assert (symmetric_folded - asymmetric).abs().max() < 1e-3 * quantization_effect
    # without the fold, the same symmetric quantization is a different model
    with torch.no_grad(), kv_transform(model, _values_only({i: (scales[i], torch.zeros(shape)) for i in range(2)})):
        unfolded = model(ids).logits
    assert (unfolded - asymmetric).abs().max() > 10 * (symmetric_folded - asymmetric).abs().max()


def test_qwen2_cannot_carry_value_centres():
    from transformers import Qwen2Config
    assert not supports_value_centering(Qwen2Config())
