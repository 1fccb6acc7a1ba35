"""Value offsets folded into a checkpoint's attention biases, for engines that quantize
the KV cache with a scale alone (:mod:`amct_hf.modeling.centering` says why it is exact).

Per attention module with value centres ``mu = -offset * scale``: ``v_proj.bias`` gets
``-mu`` added and ``o_proj.bias`` gets ``W_o @ repeat_kv(mu)``. Biases the checkpoint lacks
are created (zeros for ``q_proj`` / ``k_proj``, and for every layer without offsets), and
``config.json`` gets ``"attention_bias": true`` so that Hugging Face, vLLM and
vllm-ascend build and load them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ExportError
from ..modeling.centering import VALUE_CENTERING_MODEL_TYPES, centering_biases, supports_value_centering
from .source_model import read_tensor

__all__ = ["FoldedBiases", "fold_value_offsets"]

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class FoldedBiases:
    """Tensors to add and to replace, and the config edit, of a fold."""
    added: dict = field(default_factory=dict)
    replaced: dict = field(default_factory=dict)

    @staticmethod
    def edit_config(config: dict) -> dict:
        return {**config, "attention_bias": True}


def fold_value_offsets(pairs, source, record_file: str) -> FoldedBiases | None:
    """The fold of the value offsets of ``pairs`` (:class:`~.kvfactors.KVPair`, channel
    factors), or None when every value offset is zero. Refused (``ExportError``, one line,
    nothing written) for a model whose attention has no bias slot to carry the centres."""
    import torch

    if all(o == 0 for pair in pairs for o in pair.value[1]):
        return None
    config = source.config
    if not supports_value_centering(config):
        name = next(p.value_record_name for p in pairs if any(p.value[1]))
        raise ExportError(
            f"record {record_file}: layer {name!r} has non-zero value offsets, and a "
            f"{getattr(config, 'model_type', '?')} model has no o_proj bias to fold them into "
            f"(only {', '.join(VALUE_CENTERING_MODEL_TYPES)}); recalibrate with symmetric values "
            f"(--target ascend-c8 picks them for this model)")
    shapes = {t.name: t.shape for t in source.tensors}
    names = set(shapes)
    heads = config.num_attention_heads
    folded = FoldedBiases()
    for pair in pairs:
        weights = {p: f"{pair.attention}.{p}.weight" for p in _PROJECTIONS}
        missing = [w for w in weights.values() if w not in names]
        if missing:
            raise ExportError(f"{source.model_dir}: no tensor {missing[0]!r}; value offsets can only be "
                              f"folded into separate q/k/v/o projections")
        mu = torch.tensor([-o * s for s, o in zip(*pair.value)], dtype=torch.float64)
        prefix = f"{pair.attention}."
        biases = {p: prefix + p + ".bias" for p in _PROJECTIONS}
        present = {p for p, b in biases.items() if b in names}

        def stored(p):  # the checkpoint's bias, or the zeros a bias-free projection implies
            if p in present:
                return read_tensor(source, biases[p])
            return torch.zeros(shapes[weights[p]][0], dtype=source.dtype)
        # v_proj first: the o_proj term must undo the shift the stored (rounded) bias makes,
        # not the exact mu, or a bf16/fp16 checkpoint keeps a constant error in every token
        v_old = stored("v_proj")
        v_new = (v_old.to(torch.float64) - mu).to(v_old.dtype)
        _, o_delta = centering_biases(v_old.to(torch.float64) - v_new.to(torch.float64),
                                      read_tensor(source, weights["o_proj"]), heads)
        o_old = stored("o_proj")
        new = {"v_proj": v_new, "o_proj": (o_old.to(torch.float64) + o_delta).to(o_old.dtype)}
        for proj, bias in biases.items():
            if proj in new:
                (folded.replaced if proj in present else folded.added)[bias] = new[proj]
            elif proj not in present:
                folded.added[bias] = stored(proj)
    return folded
