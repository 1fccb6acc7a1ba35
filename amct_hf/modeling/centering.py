"""Value centring: serving an asymmetric value record on an engine that quantizes the KV
cache symmetrically (scale only).

Attention weights of a query sum to one, so shifting every value vector of a KV head by
a constant ``mu`` shifts that head's attention output by exactly ``mu``. An asymmetric
value record ``(scale s, offset o)`` represents the grid ``s * (q - o)``, centred on
``mu = -o * s``; quantizing ``v - mu`` symmetrically with the same ``s`` gives the same
grid points shifted by ``mu``. So a model whose ``v_proj`` bias is lowered by ``mu`` and
whose ``o_proj`` bias is raised by ``W_o @ repeat_kv(mu)`` computes, under symmetric
quantization, exactly what the original model computes under the asymmetric record
(``tests/modeling/test_value_centering.py``). Values are cached before RoPE touches
them, so the shift commutes with everything in between; keys are rotated after ``k_proj``
and their offsets cannot be moved into a bias this way.

The fold needs a bias slot on ``v_proj`` and ``o_proj`` that the serving engines read
from the config: Llama's ``attention_bias`` (Hugging Face and vLLM build q/k/v/o biases
from it). Qwen2's ``o_proj`` never has a bias, so it cannot carry the shift.
"""
from __future__ import annotations

__all__ = ["VALUE_CENTERING_MODEL_TYPES", "supports_value_centering", "model_supports_value_centering",
           "model_config", "centering_biases"]

#: model types whose config switches on a bias for v_proj and o_proj (``attention_bias``)
#: in Hugging Face and in vLLM / vllm-ascend alike
VALUE_CENTERING_MODEL_TYPES = ("llama",)


def supports_value_centering(config) -> bool:
    """Whether value offsets of this model can be folded into its attention biases."""
    return getattr(config, "model_type", None) in VALUE_CENTERING_MODEL_TYPES


def model_config(model, trust_remote_code: bool = False):
    """The config of a loaded model, or of a model id / folder read alone (no weights);
    None when it cannot be read: loading the model will report the real problem."""
    config = getattr(model, "config", None)
    if config is None:
        from transformers import AutoConfig
        try:
            config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
        except Exception:  # transformers raises many types; load_model names the problem
            return None
    return config


def model_supports_value_centering(model, trust_remote_code: bool = False) -> bool:
    """:func:`supports_value_centering` of a loaded model, or of a model id / folder read
    from its config alone (no weights). A config that cannot be read answers True: loading
    the model will report the real problem."""
    config = model_config(model, trust_remote_code)
    return True if config is None else supports_value_centering(config)


def centering_biases(mu, o_proj_weight, num_attention_heads: int):
    """The bias changes that fold value centres ``mu`` (``[kv_heads * head_dim]``, channel
    ``head * head_dim + d``) into one attention module: ``(v_proj_delta, o_proj_delta)``,
    to be added to the existing biases (zero where there were none). Computed in float64;
    the caller casts to the checkpoint's dtype."""
    import torch

    mu = torch.as_tensor(mu, dtype=torch.float64).reshape(-1)
    weight = o_proj_weight.to(torch.float64)
    in_features = weight.shape[1]
    if in_features % num_attention_heads:
        raise ValueError(f"o_proj has {in_features} inputs, not a multiple of {num_attention_heads} heads")
    head_dim = in_features // num_attention_heads
    if mu.numel() % head_dim or num_attention_heads % (mu.numel() // head_dim):
        raise ValueError(f"{mu.numel()} value channels do not divide into KV heads of {head_dim} "
                         f"for {num_attention_heads} query heads")
    kv_heads = mu.numel() // head_dim
    # repeat_kv: query head h reads KV head h // (heads / kv_heads)
    per_query_head = mu.reshape(kv_heads, head_dim).repeat_interleave(num_attention_heads // kv_heads, dim=0)
    return -mu, weight @ per_query_head.reshape(-1)
