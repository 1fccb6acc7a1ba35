"""Tiny decoder models built from configs, one per architecture family the plugin must
handle (no weights downloaded)."""
import torch

VOCAB = 96


def build(kind: str, seed: int = 0):
    import transformers as tf
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if kind == "llama":
        cfg, cls = tf.LlamaConfig(**common), tf.LlamaForCausalLM
    elif kind == "qwen2":
        cfg, cls = tf.Qwen2Config(**common), tf.Qwen2ForCausalLM
    elif kind == "qwen3":  # q/k RMSNorm before RoPE
        cfg, cls = tf.Qwen3Config(**common, head_dim=16), tf.Qwen3ForCausalLM
    elif kind == "mistral":  # sliding-window attention
        cfg, cls = tf.MistralConfig(**common, sliding_window=8), tf.MistralForCausalLM
    elif kind == "gemma3":  # interleaved sliding/global layers, 1 KV head
        cfg = tf.Gemma3TextConfig(**{**common, "num_key_value_heads": 1, "num_hidden_layers": 3},
                                  head_dim=16, sliding_window=8,
                                  layer_types=["sliding_attention", "full_attention", "sliding_attention"])
        cls = tf.Gemma3ForCausalLM
    elif kind == "phi3":  # fused qkv_proj: no k_proj/v_proj modules
        cfg, cls = tf.Phi3Config(**common, pad_token_id=0), tf.Phi3ForCausalLM
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    return model


KINDS = ["llama", "qwen2", "qwen3", "mistral", "gemma3"]
