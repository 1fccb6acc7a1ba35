"""What each attention layer's quantization costs alone: one full-precision pass, then one
pass per layer with only that layer's K and V quantized by the record, ranked by the
perplexity increase, and the most costly layers written as vLLM's skip list."""
from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field

import torch

from ..errors import InvalidArgumentError
from ..modeling.attention import kv_transform
from ..modeling.layout import check_record, kv_layout
from ..modeling.loading import input_device, load_model
from ..naming import attention_path, record_order
from ..record.files import load_kv_factors
from .perplexity import (
    StaticFakeQuant,
    check_chunk_args,
    chunk_batches,
    chunk_interval,
    chunk_nll,
    evaluation_samples,
    format_rows,
    perplexity_of,
)

__all__ = ["PerLayerResult", "per_layer_cost", "skip_layers_arg", "vllm_layer_index"]


#
# Which attention layers a record's static INT8 K/V hurts most: the full-precision pass
# once, then one pass per attention layer with only that layer's K and V quantize-dequantized
# by the record (every other layer full precision), on the same packed chunks
# evaluate_kv_quant uses, the layers ranked by the perplexity increase. The most costly
# ones are the candidates to keep in 16 bits; skip_layers_arg writes them as vLLM's
# --kv-cache-dtype-skip-layers takes them. vLLM (CacheConfig.kv_cache_dtype_skip_layers:
# list[str]) compares str(extract_layer_index(prefix)) of each attention layer -- the one
# integer in its module path -- with the listed strings (besides the attention-type name
# "sliding_window"), so the list holds decimal layer indices.


class _OneLayer:
    """kv_transform callback: the record's fake quantization for one attention layer's
    K and V, every other layer's states unchanged."""

    def __init__(self, factors: dict, names: list[str]):
        self.quant = StaticFakeQuant({n: factors[n] for n in names})

    def __call__(self, name: str, states: torch.Tensor) -> torch.Tensor:
        return self.quant(name, states) if name in self.quant.factors else states


@dataclass
class PerLayerResult:
    """The full-precision perplexity and, per attention layer (most costly first), the
    perplexity with only that layer's K/V quantized by the record."""
    baseline_ppl: float
    #: [{"layer": attention module path, "index": layer index or None, "ppl",
    #:   "relative_increase", "interval"}], most costly first
    layers: list
    record_file: str
    num_samples: int
    seq_len: int
    num_tokens: int
    seconds: float = 0.0
    baseline_chunk_nll: list = field(default_factory=list)

    def most_costly(self, n: int) -> list[dict]:
        """The ``n`` most costly layers."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InvalidArgumentError(f"the number of layers to keep must be a non-negative int, got {n!r}")
        return self.layers[:n]

    def table(self) -> str:
        rows = [("rank", "layer", "ppl", "rel. increase", "95% interval")]
        for rank, row in enumerate(self.layers, 1):
            iv = row["interval"]
            rows.append((str(rank), row["layer"], f"{row['ppl']:.4f}", f"{100 * row['relative_increase']:+.3f}%",
                         f"[{100 * iv['low']:+.3f}%, {100 * iv['high']:+.3f}%]" if iv else ""))
        head = (f"{self.num_samples} x {self.seq_len} tokens ({self.num_tokens} predicted), record "
                f"{self.record_file}; full precision ppl {self.baseline_ppl:.4f}; one layer's K and V "
                "quantized at a time, most costly first:")
        return "\n".join([head, *format_rows(rows)])


def vllm_layer_index(path: str) -> int | None:
    """The layer index vLLM reads from an attention module path: its one integer
    component (``model.layers.7.self_attn`` -> 7); None when there is not exactly one."""
    numbers = [int(p) for p in path.split(".") if re.fullmatch(r"\d+", p)]
    return numbers[0] if len(numbers) == 1 else None


def skip_layers_arg(layers: list[dict]) -> str:
    """The value of vLLM's ``--kv-cache-dtype-skip-layers`` for these layers: their
    indices, ascending, space-separated (``vllm serve M --kv-cache-dtype fp8
    --kv-cache-dtype-skip-layers 3 11``; in Python ``kv_cache_dtype_skip_layers=["3", "11"]``)."""
    missing = [row["layer"] for row in layers if row["index"] is None]
    if missing:
        raise InvalidArgumentError(f"layer {missing[0]!r} has no single layer index in its module path, "
                                   "which is how vLLM names the layers it skips")
    return " ".join(str(i) for i in sorted(row["index"] for row in layers))


def per_layer_cost(model, dataset, record_file, *, tokenizer=None, num_samples: int = 8, seq_len: int = 512,
                   batch_size: int = 1, skip_tokens: int = 0, split: str = "train", text_column: str = "text",
                   chat_template: bool | str = False, device_map=None, dtype=None,
                   trust_remote_code: bool = False, progress: bool = False, max_memory=None,
                   offload_folder=None) -> PerLayerResult:
    """Rank the attention layers by what quantizing that layer alone (its K and V, with
    ``record_file``'s factors) costs in perplexity, on the chunks
    :func:`~amct_hf.evaluation.perplexity.evaluate_kv_quant` evaluates with the same
    arguments. One full-precision pass, then one pass per layer; each layer's increase
    comes with a paired-bootstrap 95% interval over the chunks. Ties keep the model's
    layer order."""
    from ..data.samples import load_texts

    started = time.time()
    check_chunk_args(num_samples, seq_len, batch_size, skip_tokens)
    factors, where = load_kv_factors(record_file)
    texts = load_texts(dataset, split=split, text_column=text_column, messages=chat_template is not False)
    model, tok = load_model(model, device_map=device_map, dtype=dtype, trust_remote_code=trust_remote_code,
                            tokenizer=tokenizer, max_memory=max_memory, offload_folder=offload_folder)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            layout = kv_layout(model)
            check_record(factors, layout, where)
            samples = evaluation_samples(tok, texts, seq_len, num_samples, skip_tokens, chat_template)
            batches = chunk_batches(samples, batch_size)
            device = input_device(model)
            nll, count, base_chunks = chunk_nll(model, batches, device, "full precision", progress)
            baseline = perplexity_of(nll, count)
            if not math.isfinite(baseline):
                raise InvalidArgumentError(f"the model's own full-precision perplexity is {baseline}: "
                                           "its outputs are not finite")
            tokens = [int(b.shape[1]) - 1 for b in batches for _ in range(b.shape[0])]
            groups: dict[str, list[str]] = {}
            for name in record_order(layout):
                groups.setdefault(attention_path(name), []).append(name)
            rows = []
            for path, names in groups.items():
                with kv_transform(model, _OneLayer(factors, names)):
                    q_nll, q_count, q_chunks = chunk_nll(model, batches, device, path, progress)
                ppl = perplexity_of(q_nll, q_count)
                rows.append({"layer": path, "index": vllm_layer_index(path), "ppl": ppl,
                             "relative_increase": ppl / baseline - 1.0,
                             "interval": chunk_interval(base_chunks, q_chunks, tokens)})
    finally:
        model.train(was_training)
    rows.sort(key=lambda r: -r["relative_increase"])  # stable: ties keep the layer order
    return PerLayerResult(
        baseline_ppl=baseline, layers=rows,
        record_file=os.fspath(record_file) if isinstance(record_file, (str, os.PathLike)) else "<factors>",
        num_samples=len(samples), seq_len=seq_len, num_tokens=count, seconds=time.time() - started,
        baseline_chunk_nll=base_chunks)
