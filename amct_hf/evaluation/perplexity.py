"""What a record's INT8 KV cache costs in perplexity, and which layers it hurts.

``evaluate_kv_quant(model, dataset, record_file)`` packs the evaluation text into
``num_samples`` chunks of ``seq_len`` tokens (as calibration does; no padding) and
computes perplexity -- ``exp(sum NLL / predicted tokens)``, every chunk predicting its
tokens 2..seq_len -- on the same chunks for:

* ``baseline``: the full-precision KV cache;
* ``quantized``: K/V quantize-dequantized with the record's factors (SPEC §3,
  ``q = clip(round(x/s) + o, -128, 127)``, ``x_hat = (q - o) * s``), applied to the
  post-RoPE states every attention reads (:func:`amct_hf.modeling.attention.kv_transform`),
  i.e. exactly what :class:`amct_hf.modeling.cache.StaticInt8KVCache` hands the attention;
* reference ``minmax``: static asymmetric min-max factors at the record's granularity
  (per layer: one factor, or one per channel), taken over the **evaluation chunks
  themselves** during the baseline pass. It is an oracle: it has seen the test tokens
  and never clips them, so it shows what "no clipping, full range" gives; a record
  calibrated elsewhere that beats it clips outliers profitably;
* reference ``dynamic_per_token``: asymmetric min-max factors computed on the fly for
  every token and head (one scale/offset per ``head_dim`` vector): the usual dynamic
  INT8 KV baseline, which needs no calibration.

Min-max factors use the SPEC's asymmetric rule (the range always includes 0), as
:func:`amct_hf.algorithms.convention.minmax_factors` computes them.

Per layer, for each quantized run, ``rel_mse = sum ||x_hat - x||^2 / sum ||x||^2`` over
all evaluation tokens, with ``x`` the K (or V) states that layer computes in that run
(so errors of earlier layers are included, as in deployment), and for the record the
fraction of values outside its representable range (``clip_fraction``).

Evaluate at the lengths you deploy: post-RoPE key ranges depend on position, so a
record calibrated on shorter chunks clips more on longer ones (SmolLM2, record from
4 x 256 tokens: +0.4% perplexity on 256-token chunks, +1.0% on 512-token chunks, where
the keys of every layer clip ~1%).

The record is checked against the model (names, channel counts, per-tensor vs
per-channel sizes) with one 2-token probe forward before any evaluation pass; a
mismatch is refused naming the first mismatching layer.

With ``export_dir`` instead of a record, the export directory is read the way its engine
reads it (:mod:`amct_hf.evaluation.served`): its own weights (folded biases included) and
its scales in the engine's arithmetic (scale-only INT8 for ``ascend-c8``, E4M3 for
``vllm-fp8`` / ``modelopt-fp8``); the references are then E4M3 with scale 1.0 (the engines'
uncalibrated default) and dynamic per-token INT8.

``per_layer_cost(model, dataset, record_file)`` ranks the attention layers by what
quantizing that layer alone costs (one full-precision pass, then one pass per layer), and
``skip_layers_arg`` writes the most costly ones as vLLM's ``--kv-cache-dtype-skip-layers``
takes them (section "per-layer cost" below).
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..algorithms.convention import fake_quantize, minmax_factors
from ..errors import InvalidArgumentError
from ..modeling.attention import kv_calibration, kv_transform
from ..modeling.layout import broadcast_factor, check_record, kv_layout
from ..modeling.loading import input_device, load_model, resolve_dtype
from ..naming import attention_path, layer_kind, record_order
from ..observers.minmax import MinMaxRanges
from ..record.files import load_kv_factors
from ..settings.validate import positive_int
from .intervals import paired_relative_increase
from .served import fp8_e4m3, load_export_model, read_served_export

__all__ = ["evaluate_kv_quant", "EvalResult", "per_layer_cost", "PerLayerResult", "layer_index", "skip_layers_arg"]

logger = logging.getLogger("amct_hf")
_LABELS = {"baseline": "full precision", "quantized": "record (static INT8)",
           "minmax": "min-max on eval data (oracle)", "dynamic_per_token": "dynamic per-token INT8",
           "fp8_scale_1": "FP8 E4M3, scale 1.0 (uncalibrated)"}


class _LayerError:
    """sum ||x_hat - x||^2, sum ||x||^2 and clipped-value counts of one layer in one run."""

    __slots__ = ("err", "ref", "clipped", "values")

    def __init__(self):
        self.err = self.ref = 0.0
        self.clipped = self.values = 0

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, clipped: torch.Tensor | None) -> None:
        self.err += float((x_hat - x).double().pow(2).sum())
        self.ref += float(x.double().pow(2).sum())
        if clipped is not None:
            self.clipped += int(clipped.sum())
        self.values += x.numel()

    @property
    def rel_mse(self) -> float:
        return self.err / self.ref if self.ref > 0 else (0.0 if self.err == 0 else math.inf)


class _StaticFakeQuant:
    """kv_transform callback: quantize-dequantize with fixed factors per record key."""

    def __init__(self, factors: dict):
        # (scale, offset) as flat float32 tensors; broadcast shapes need kv_heads, known
        # only from the states, so they are made on first use
        self.factors = {name: (torch.as_tensor(s, dtype=torch.float32).reshape(-1),
                               torch.as_tensor(o, dtype=torch.float32).reshape(-1))
                        for name, (s, o) in factors.items()}
        self.errors: dict[str, _LayerError] = {}
        self._shaped: dict = {}  # (name, device) -> broadcast factors: one copy per device

    def __call__(self, name: str, states: torch.Tensor) -> torch.Tensor:
        key = (name, states.device)
        if key not in self._shaped:
            s, o = self.factors[name]
            self._shaped[key] = (broadcast_factor(s, states, name), broadcast_factor(o, states, name))
        s, o = self._shaped[key]
        x = states.float()
        x_hat, clipped = fake_quantize(x, s, o, clipped=True)
        self.errors.setdefault(name, _LayerError()).add(x, x_hat, clipped)
        return x_hat.to(states.dtype)


class _Measured:
    """kv_transform callback around ``function(name, x float32) -> (x_hat, clipped)``,
    recording each layer's error."""

    def __init__(self, function, query=None):
        self.function = function
        self.query = query  # kv_transform also routes the query through it when set
        self.errors: dict[str, _LayerError] = {}

    def __call__(self, name: str, states: torch.Tensor) -> torch.Tensor:
        x = states.float()
        x_hat, clipped = self.function(name, x)
        self.errors.setdefault(name, _LayerError()).add(x, x_hat, clipped)
        return x_hat.to(states.dtype)


def _fp8_unit_scale(name: str, x: torch.Tensor):
    return fp8_e4m3(x, torch.ones((), device=x.device))


def _fp8_unit_query(path: str, q: torch.Tensor) -> torch.Tensor:
    return fp8_e4m3(q.float(), torch.ones((), device=q.device))[0].to(q.dtype)


class _DynamicPerToken:
    """kv_transform callback: asymmetric min-max INT8 per token and head (head_dim vector)."""

    def __init__(self):
        self.errors: dict[str, _LayerError] = {}

    def __call__(self, name: str, states: torch.Tensor) -> torch.Tensor:
        x = states.float()
        s, o = minmax_factors(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True))
        x_hat = fake_quantize(x, s, o)
        self.errors.setdefault(name, _LayerError()).add(x, x_hat, None)
        return x_hat.to(states.dtype)


# --------------------------------------------------------------------------- result

@dataclass
class EvalResult:
    """Perplexities of one evaluation and per-layer K/V quantization errors."""
    baseline_ppl: float
    quantized_ppl: float
    references: dict          # "minmax"/"dynamic_per_token" -> {"ppl", "relative_increase", "interval"}
    layers: dict              # record key -> {"rel_mse", "clip_fraction", "channels", ...}
    record_file: str
    granularity: str          # "per_tensor", "per_channel" or "mixed"
    num_samples: int
    seq_len: int
    num_tokens: int           # predicted tokens (the NLL's denominator)
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)
    #: summed NLL of every chunk (same chunks, same order in both runs) and its predicted
    #: tokens: what the paired bootstrap resamples
    baseline_chunk_nll: list = field(default_factory=list)
    quantized_chunk_nll: list = field(default_factory=list)
    chunk_tokens: list = field(default_factory=list)
    chunks_digest: str = ""   # sha256 of the evaluated token ids, in batch order
    #: paired-bootstrap interval of relative_increase (:mod:`amct_hf.evaluation.intervals`), as
    #: {"point", "low", "high", "confidence", "resamples", "chunks"}; None below 2 chunks
    interval: dict | None = None

    @property
    def relative_increase(self) -> float:
        return self.quantized_ppl / self.baseline_ppl - 1.0

    def to_dict(self) -> dict:
        data = asdict(self)
        meta = data.pop("meta")
        return {**data, "relative_increase": self.relative_increase, **meta}

    def table(self, worst: int = 3) -> str:
        """The perplexity table, then per-layer relative MSE of K and V (the ``worst``
        layers by record error marked with ``*``)."""
        served = self.meta.get("served")
        rows = [("run", "ppl", "rel. increase", _interval_head(self.interval)),
                (_LABELS["baseline"], f"{self.baseline_ppl:.4f}", "-", ""),
                (served or f"{_LABELS['quantized']}, {self.granularity}", f"{self.quantized_ppl:.4f}",
                 f"{100 * self.relative_increase:+.3f}%", _interval_cell(self.interval))]
        for name, ref in self.references.items():
            rows.append((_LABELS.get(name, name), f"{ref['ppl']:.4f}", f"{100 * ref['relative_increase']:+.3f}%",
                         _interval_cell(ref.get("interval"))))
        lines = [f"{self.num_samples} x {self.seq_len} tokens ({self.num_tokens} predicted), "
                 f"{'export' if served else 'record'} {self.record_file}", *_format_rows(rows), ""]

        pairs: dict[str, dict[str, str]] = {}  # attention module -> {"K": key name, "V": ...}
        for name in self.layers:
            pairs.setdefault(attention_path(name), {})["K" if layer_kind(name) == "key" else "V"] = name
        marked = sorted(self.layers, key=lambda n: -self.layers[n]["rel_mse"])[:worst]
        has_refs = any("rel_mse_minmax" in s for s in self.layers.values())
        head = ["layer", "K rel MSE", "K clip", "V rel MSE", "V clip"]
        if has_refs:
            head += ["K mm/dyn", "V mm/dyn"]
        rows = [tuple(head)]
        for base, kv in pairs.items():
            row = [base]
            for kind in "KV":
                st = self.layers.get(kv.get(kind))
                mark = "*" if kv.get(kind) in marked else " "
                row += [f"{st['rel_mse']:.3e}{mark}", f"{100 * st['clip_fraction']:.3f}%"] if st else ["-", "-"]
            if has_refs:
                for kind in "KV":
                    st = self.layers.get(kv.get(kind)) or {}
                    row.append(f"{st.get('rel_mse_minmax', math.nan):.2e}/"
                               f"{st.get('rel_mse_dynamic_per_token', math.nan):.2e}")
            rows.append(tuple(row))
        lines += ["per-layer relative MSE ||x_hat - x||^2 / ||x||^2 over the eval tokens "
                  f"(record; * = worst {worst}; mm/dyn = references):", *_format_rows(rows)]
        return "\n".join(lines)


def _interval_head(interval) -> str:
    return f"{100 * interval['confidence']:.0f}% interval" if interval else ""


def _interval_cell(interval) -> str:
    return f"[{100 * interval['low']:+.3f}%, {100 * interval['high']:+.3f}%]" if interval else ""


def _interval(baseline_chunks, chunks, tokens) -> dict | None:
    """Paired bootstrap over the chunks (None when there are too few to resample)."""
    if len(chunks) < 2:
        return None
    return paired_relative_increase(baseline_chunks, chunks, tokens).to_dict()


def _digest(batches) -> str:
    h = hashlib.sha256()
    for b in batches:
        h.update(str(tuple(b.shape)).encode())
        h.update(b.numpy().tobytes())
    return h.hexdigest()


def _check_reuse(baseline, digest: str, references: bool) -> None:
    if baseline is None:
        return
    if references:
        raise InvalidArgumentError("baseline= reuses an earlier full-precision pass; the references "
                                   "need their own, so pass references=False with it")
    if not isinstance(baseline, EvalResult) or baseline.chunks_digest != digest:
        raise InvalidArgumentError("baseline= is not a result on the same evaluation chunks (dataset, "
                                   "seq_len, num_samples, skip_tokens and batch_size must match)")


def _format_rows(rows) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    return out


# --------------------------------------------------------------------------- evaluation

def _nll(model: nn.Module, batches, device, desc: str, progress: bool) -> tuple[float, int, list]:
    """Summed next-token NLL (float64), the number of predicted tokens and each chunk's
    summed NLL (in batch order)."""
    total, count, chunks = 0.0, 0, []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(batches), desc=desc, unit="batch", leave=False)
    for batch in batches:
        ids = batch.to(device)
        logits = model(input_ids=ids, use_cache=False).logits
        # float32 log-softmax even for a bf16 model: the reduction decides the ppl digits
        nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                              ids[:, 1:].reshape(-1), reduction="none")
        per_chunk = nll.double().reshape(ids.shape[0], -1).sum(1)
        chunks += per_chunk.tolist()
        total += float(per_chunk.sum())
        count += ids[:, 1:].numel()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return total, count, chunks


def _ppl(nll: float, count: int) -> float:
    return math.exp(nll / count)


def _granularity(factors: dict) -> str:
    kinds = {"per_tensor" if len(s) == 1 else "per_channel" for s, _ in factors.values()}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def _batches(samples, batch_size):
    # packed samples all have seq_len tokens (a lone shorter one stays alone): no padding
    by_len: dict[int, list] = {}
    for s in samples:
        by_len.setdefault(len(s), []).append(s)
    out = []
    for group in by_len.values():
        for i in range(0, len(group), batch_size):
            out.append(torch.tensor(group[i:i + batch_size], dtype=torch.long))
    return out


def evaluate_kv_quant(model, dataset, record_file=None, *, tokenizer=None, num_samples: int = 8,
                      seq_len: int = 512, batch_size: int = 1, skip_tokens: int = 0,
                      split: str = "train", text_column: str = "text", references: bool = True,
                      device_map=None, dtype=None, trust_remote_code: bool = False,
                      progress: bool = False, max_memory=None, offload_folder=None,
                      baseline: EvalResult | None = None, export_dir=None, fp8_query: bool = False,
                      chat_template: bool | str = False) -> EvalResult:
    """Perplexity with the full-precision KV cache vs K/V quantized by ``record_file``'s
    factors (plus min-max and dynamic per-token references), on ``num_samples`` packed
    chunks of ``seq_len`` tokens of ``dataset``, and per-layer K/V relative MSE.

    ``model``: id, local folder or loaded model (then pass ``tokenizer``). ``dataset``:
    anything :func:`amct_hf.data.samples.load_texts` reads. ``skip_tokens``: leave out the first
    tokens of the packed text (rounded up to whole chunks), e.g. the
    ``num_samples * seq_len`` tokens calibration used when evaluating on the same corpus.
    ``record_file`` may also be a ``{record key: (scales, offsets)}`` mapping.

    Every increase comes with a paired-bootstrap interval over the chunks
    (``EvalResult.interval``, each reference's ``"interval"``; :mod:`amct_hf.evaluation.intervals`).
    ``baseline``: an earlier result on the very same chunks (checked by their digest),
    whose full-precision pass is reused instead of run again, to compare several records
    at the cost of one pass each; it needs ``references=False``.
    ``chat_template``: evaluate on the texts rendered through the tokenizer's chat template
    (as calibration's option of that name renders them).

    ``export_dir``: an ``ascend-c8``, ``vllm-fp8`` or ``modelopt-fp8`` export directory,
    evaluated as its engine serves it (module doc), in place of ``record_file``; the model
    and tokenizer are the export's own, so ``model`` must be None (it is built from the
    export's config and shards in CPU memory). ``fp8_query``: with an
    FP8 export, also quantize the query to E4M3 with the export's ``q_scale`` (1.0 without
    one; the scale-1.0 reference likewise), as vLLM's FlashAttention 3, Triton and
    FlashInfer backends do with an FP8 KV cache.
    """
    from ..data.samples import load_texts, tokenize_samples

    started = time.time()
    for arg, value in (("num_samples", num_samples), ("seq_len", seq_len), ("batch_size", batch_size)):
        positive_int(arg, value)
    if seq_len < 2:
        raise InvalidArgumentError(f"seq_len must be at least 2 (one token to predict), got {seq_len}")
    if isinstance(skip_tokens, bool) or not isinstance(skip_tokens, int) or skip_tokens < 0:
        raise InvalidArgumentError(f"skip_tokens must be a non-negative int, got {skip_tokens!r}")
    served = None
    if export_dir is not None:
        if record_file is not None or model is not None:
            raise InvalidArgumentError("export_dir= evaluates an export with its own model and scales; "
                                       "pass neither a record nor a model with it")
        if device_map is not None or max_memory is not None or offload_folder is not None:
            raise InvalidArgumentError("export_dir= builds the export's model on the CPU from its shards; "
                                       "device_map/max_memory/offload_folder are not supported with it")
        factors, where = None, os.fspath(export_dir)
        texts = load_texts(dataset, split=split, text_column=text_column, messages=chat_template is not False)
        model, tensors = load_export_model(export_dir, resolve_dtype(dtype), trust_remote_code)
        served = read_served_export(export_dir, next(model.parameters()).dtype, tensors)
        served.fp8_query = bool(fp8_query)
        if fp8_query:
            served.query_function()  # refused for an INT8 export, before any pass
        del tensors
        model, tok = load_model(model, tokenizer=tokenizer if tokenizer is not None else os.fspath(export_dir),
                                trust_remote_code=trust_remote_code)
    elif fp8_query:
        raise InvalidArgumentError("fp8_query= simulates an FP8 engine; it needs export_dir=")
    elif record_file is None:
        raise InvalidArgumentError("pass a record file (record_file=) or an export directory (export_dir=)")
    else:
        factors, where = load_kv_factors(record_file)  # a bad file fails before the model loads
        texts = load_texts(dataset, split=split, text_column=text_column, messages=chat_template is not False)
        model, tok = load_model(model, device_map=device_map, dtype=dtype,
                                trust_remote_code=trust_remote_code, tokenizer=tokenizer,
                                max_memory=max_memory, offload_folder=offload_folder)
    was_training = model.training
    model.eval()  # dropout would make the runs incomparable
    try:
        with torch.no_grad():
            layout = kv_layout(model)  # the one probe forward, before any evaluation pass
            if served is None:
                check_record(factors, layout, where)
            else:
                for name in layout:
                    served.scale_for(name)  # every attention layer has its scales

            skip = -(-skip_tokens // seq_len)
            samples = tokenize_samples(tok, texts, seq_len=seq_len, num_samples=skip + num_samples,
                                       chat_template=chat_template)
            if skip and len(samples) <= skip:
                raise InvalidArgumentError(f"skip_tokens={skip_tokens} leaves no evaluation text: the dataset "
                                 f"packs into only {len(samples)} chunk(s) of {seq_len} tokens")
            samples = samples[skip:]
            if sum(len(sample) - 1 for sample in samples) == 0:
                raise InvalidArgumentError("the evaluation text has a single token: nothing to predict")
            batches = _batches(samples, batch_size)
            digest = _digest(batches)
            _check_reuse(baseline, digest, references)
            device = input_device(model)
            result = _evaluate(model, batches, device, factors, layout, references, progress, baseline,
                               served)
    finally:
        model.train(was_training)

    baseline, quantized, refs, layers, count, chunks = result
    source = export_dir if served is not None else record_file
    meta = {"served": served.label + (", query FP8" if fp8_query else ""), "export_format": served.format,
            "fp8_query": bool(fp8_query)} if served is not None else {}
    return EvalResult(
        baseline_ppl=baseline, quantized_ppl=quantized, references=refs, layers=layers,
        record_file=os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<factors>",
        granularity=served.granularity if served is not None else _granularity(factors),
        num_samples=len(samples), seq_len=seq_len, num_tokens=count,
        seconds=time.time() - started, chunks_digest=digest, meta=meta, **chunks)


def _evaluate(model, batches, device, factors, layout, references, progress, reuse=None, served=None):
    ranges = MinMaxRanges()
    if served is not None:  # min-max needs a record's granularity; it has no meaning here
        ranges = None
    if reuse is not None:  # an earlier result's full-precision pass over these very chunks
        nll, count, base_chunks = sum(reuse.baseline_chunk_nll), reuse.num_tokens, reuse.baseline_chunk_nll
    elif references and ranges is not None:  # the baseline pass also collects the min-max ranges
        with kv_calibration(model, ranges):
            nll, count, base_chunks = _nll(model, batches, device, "full precision", progress)
    else:
        nll, count, base_chunks = _nll(model, batches, device, "full precision", progress)
    baseline = _ppl(nll, count)
    tokens = [int(b.shape[1]) - 1 for b in batches for _ in range(b.shape[0])]
    if not math.isfinite(baseline):
        raise InvalidArgumentError(
            f"the model's own full-precision perplexity is {baseline}: its outputs are not "
            "finite (NaN/Inf weights, or float16 overflow: load it in float32 or bfloat16)")

    fp8_query = served is not None and getattr(served, "fp8_query", False)
    record = _StaticFakeQuant(factors) if served is None else \
        _Measured(served.function(), served.query_function() if fp8_query else None)
    with kv_transform(model, record):
        q_nll, q_count, q_chunks = _nll(model, batches, device, "record", progress)
    quantized = _ppl(q_nll, q_count)

    layers = {name: {"rel_mse": err.rel_mse,
                     "clip_fraction": err.clipped / err.values if err.values else 0.0,
                     "channels": layout[name].channels,
                     "granularity": served.granularity if served is not None
                     else "per_tensor" if len(factors[name][0]) == 1 else "per_channel"}
              for name, err in record.errors.items()}
    refs = {}
    if references:
        first = ("minmax", _StaticFakeQuant(ranges.factors(factors))) if served is None \
            else ("fp8_scale_1", _Measured(_fp8_unit_scale, _fp8_unit_query if fp8_query else None))
        for ref_name, transform in (first, ("dynamic_per_token", _DynamicPerToken())):
            with kv_transform(model, transform):
                r_nll, r_count, r_chunks = _nll(model, batches, device, ref_name, progress)
            ppl = _ppl(r_nll, r_count)
            refs[ref_name] = {"ppl": ppl, "relative_increase": ppl / baseline - 1.0,
                              "interval": _interval(base_chunks, r_chunks, tokens)}
            for name, err in transform.errors.items():
                layers.setdefault(name, {})[f"rel_mse_{ref_name}"] = err.rel_mse
    chunks = {"baseline_chunk_nll": base_chunks, "quantized_chunk_nll": q_chunks, "chunk_tokens": tokens,
              "interval": _interval(base_chunks, q_chunks, tokens)}
    return baseline, quantized, refs, layers, count, chunks


# --------------------------------------------------------------------------- per-layer cost
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
        self.quant = _StaticFakeQuant({n: factors[n] for n in names})

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
        return "\n".join([head, *_format_rows(rows)])


def layer_index(path: str) -> int | None:
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
    from ..data.samples import load_texts, tokenize_samples

    started = time.time()
    for arg, value in (("num_samples", num_samples), ("seq_len", seq_len), ("batch_size", batch_size)):
        positive_int(arg, value)
    if seq_len < 2:
        raise InvalidArgumentError(f"seq_len must be at least 2 (one token to predict), got {seq_len}")
    if isinstance(skip_tokens, bool) or not isinstance(skip_tokens, int) or skip_tokens < 0:
        raise InvalidArgumentError(f"skip_tokens must be a non-negative int, got {skip_tokens!r}")
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
            skip = -(-skip_tokens // seq_len)
            samples = tokenize_samples(tok, texts, seq_len=seq_len, num_samples=skip + num_samples,
                                       chat_template=chat_template)
            if skip and len(samples) <= skip:
                raise InvalidArgumentError(f"skip_tokens={skip_tokens} leaves no evaluation text: the dataset "
                                           f"packs into only {len(samples)} chunk(s) of {seq_len} tokens")
            samples = samples[skip:]
            if sum(len(s) - 1 for s in samples) == 0:
                raise InvalidArgumentError("the evaluation text has a single token: nothing to predict")
            batches = _batches(samples, batch_size)
            device = input_device(model)
            nll, count, base_chunks = _nll(model, batches, device, "full precision", progress)
            baseline = _ppl(nll, count)
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
                    q_nll, q_count, q_chunks = _nll(model, batches, device, path, progress)
                ppl = _ppl(q_nll, q_count)
                rows.append({"layer": path, "index": layer_index(path), "ppl": ppl,
                             "relative_increase": ppl / baseline - 1.0,
                             "interval": _interval(base_chunks, q_chunks, tokens)})
    finally:
        model.train(was_training)
    rows.sort(key=lambda r: -r["relative_increase"])  # stable: ties keep the layer order
    return PerLayerResult(
        baseline_ppl=baseline, layers=rows,
        record_file=os.fspath(record_file) if isinstance(record_file, (str, os.PathLike)) else "<factors>",
        num_samples=len(samples), seq_len=seq_len, num_tokens=count, seconds=time.time() - started,
        baseline_chunk_nll=base_chunks)
