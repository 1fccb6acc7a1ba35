"""Calibrated FP8 query scales for ``vllm-fp8`` (``<attn>.q_scale``).

With an FP8 KV cache, vLLM's FlashAttention 3, Triton (CUDA) and FlashInfer backends
quantize the query to FP8 E4M3 with the layer's ``q_scale`` (1.0 when the checkpoint has
none). The queries are observed here through the same attention hook that carries K/V
(post-RoPE, exactly what the attention receives), and ``q_scale = amax / 448``: per
attention layer, or per KV head (the amax over that head's group of query heads, the
``[num_kv_heads]`` shape vLLM creates for ``strategy: attn_head``).
"""
from __future__ import annotations

import torch

from ..errors import InvalidArgumentError
from .vllm import FP8_E4M3_MAX

__all__ = ["calibrate_query_scales"]


class _QueryAmax:
    """kv_transform callback: K/V unchanged; the query's amax per KV-head group recorded."""

    def __init__(self, kv_heads: int):
        self.kv_heads = kv_heads
        self.amax: dict[str, torch.Tensor] = {}

    def __call__(self, name, states):
        return states

    def query(self, path, q):
        heads = q.shape[1]
        a = q.detach().float().abs().transpose(0, 1).reshape(self.kv_heads, heads // self.kv_heads, -1).amax((1, 2))
        self.amax[path] = torch.maximum(self.amax[path], a.cpu()) if path in self.amax else a.cpu()
        return q


def calibrate_query_scales(model, dataset, *, tokenizer=None, num_samples: int = 16, seq_len: int = 512,
                           per_head: bool = False, dtype=None, trust_remote_code: bool = False) -> dict:
    """``{attention path: [q_scale]}`` (one value, or one per KV head with ``per_head``),
    the largest query magnitude seen on ``num_samples`` packed chunks over 448."""
    from ..data.samples import load_texts, tokenize_samples
    from ..modeling.attention import kv_transform
    from ..modeling.loading import input_device, load_model, text_config

    model, tok = load_model(model, dtype=dtype, tokenizer=tokenizer, trust_remote_code=trust_remote_code)
    samples = tokenize_samples(tok, load_texts(dataset), seq_len=seq_len, num_samples=num_samples)
    if not samples:
        raise InvalidArgumentError("the query calibration text packs into no chunk")
    config = text_config(model)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    observer = _QueryAmax(kv_heads)
    device = input_device(model)
    with torch.no_grad(), kv_transform(model, observer):
        for sample in samples:
            model(input_ids=torch.tensor([sample], device=device), use_cache=False)
    out = {}
    for path, amax in observer.amax.items():
        values = amax if per_head else amax.max().reshape(1)
        out[path] = [max(float(v), 1e-12) / FP8_E4M3_MAX for v in values]
    return out
