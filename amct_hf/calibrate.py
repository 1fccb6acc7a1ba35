"""calibrate_kv_cache: one call from a model and a dataset to a record of K/V factors.

Samples are split between processes (``accelerate launch`` / ``torchrun``); every
layer's statistics are reduced across processes once, after the last batch, then the
algorithm runs and the main process writes the record. With the default
``mode="streaming"`` the statistics are bounded-memory aligned histograms (see
:mod:`amct_hf.streaming`); ``mode="exact"`` keeps every value and gives exactly the
factors of a ``QuantCalibrationOp`` fed all samples as one batch. In both modes the
factors depend only on the set of calibration tokens, not on batch size, batch order
or the number of processes.
"""
from __future__ import annotations

import inspect
import logging
import os
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .data import load_texts, make_batches, shard, tokenize_samples
from .distributed import Comm
from .hooks import TAPS, KVCalibrationHooks
from .observers import make_observer
from .offload import check_max_memory, offload_kwargs
from .op import as_channels
from .params import QuantParams, parse_quant_algo_params
from .record import write_kv_factors

__all__ = ["calibrate_kv_cache", "CalibrationResult", "LayerCollector", "MODES", "load_model",
           "widen_ranges", "input_device", "no_logits_kwargs"]

logger = logging.getLogger("amct_hf")
MODES = ("streaming", "exact")


@dataclass
class CalibrationResult:
    """Factors per record key (``model.layers.{i}.self_attn.k_proj`` ...) and where they went."""
    record_file: str
    factors: dict  # layer -> (scales list[float], offsets list[int])
    params: QuantParams
    num_samples: int
    num_tokens: int
    seconds: float
    tolerance: dict = field(default_factory=dict)  # layer -> IFMR streaming bound (max over channels)

    def __getitem__(self, layer):
        return self.factors[layer]

    def __iter__(self):
        return iter(self.factors)

    def __len__(self):
        return len(self.factors)

    def summary(self) -> str:
        """A table: layer, channels, scale range, offset range."""
        rows = [("layer", "ch", "scale min", "scale max", "offset min", "offset max")]
        for name, (s, o) in self.factors.items():
            rows.append((name, str(len(s)), f"{min(s):.6g}", f"{max(s):.6g}", str(min(o)), str(max(o))))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"{len(self.factors)} layers, {self.num_samples} samples, {self.num_tokens} tokens, "
                     f"{self.seconds:.1f} s -> {self.record_file}")
        return "\n".join(lines)


class LayerCollector:
    """The observer sink of the hooks: one observer per record key."""

    def __init__(self, params: QuantParams, mode: str, stream_bins: int | None = None):
        self.params, self.mode, self.stream_bins = params, mode, stream_bins
        self.observers: dict = {}

    def new_observer(self, channels: int | None = None):
        kind = f"{self.params.act_algo}_{'stream' if self.mode == 'streaming' else 'exact'}"
        obs = make_observer(self.params, kind, **({"bins": self.stream_bins} if self.stream_bins and
                                                 self.mode == "streaming" else {}))
        obs.num_channels = channels
        return obs

    def __call__(self, name: str, x: torch.Tensor) -> None:
        obs = self.observers.get(name)
        if obs is None:
            obs = self.observers[name] = self.new_observer()
        x = as_channels(x, self.params.per_channel)
        if obs.num_channels not in (None, x.shape[1]):
            raise RuntimeError(f"layer {name!r}: channel count changed from {obs.num_channels} to {x.shape[1]}")
        obs.update(x)
        obs.num_channels = x.shape[1]

    def finalize(self, comm: Comm) -> tuple[dict, dict]:
        """Reduce across processes and solve every layer; identical on all ranks."""
        mine = {n: o.num_channels for n, o in self.observers.items()}
        layers = mine
        if comm.active:
            import torch.distributed as dist
            everyone = [None] * comm.world_size
            dist.all_gather_object(everyone, mine)
            layers = {}
            for d in everyone:  # rank order, then first-seen order: the same on every rank
                for n, c in d.items():
                    layers.setdefault(n, c)
        factors, tolerance = {}, {}
        for name in sorted(layers, key=_layer_sort_key):
            obs = self.observers.get(name)
            if obs is None:  # this rank saw no token of that layer (uneven split)
                obs = self.observers[name] = self.new_observer(layers[name])
                if hasattr(obs, "ensure"):
                    obs.ensure(layers[name])
            obs.reduce(comm)
            scales, offsets = obs.compute()
            factors[name] = ([float(s) for s in scales.cpu().tolist()], [int(o) for o in offsets.cpu().tolist()])
            if getattr(obs, "tolerance", None) is not None:
                tolerance[name] = float(obs.tolerance.max())
            del self.observers[name]
        return factors, tolerance


def _layer_sort_key(name: str):
    # model.layers.10 after model.layers.9; keys before values within a layer
    parts = name.split(".")
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts]


def load_model(model, *, device_map=None, dtype=None, trust_remote_code=False, tokenizer=None,
               max_memory=None, offload_folder=None):
    """(model, tokenizer) from an id/path or an already loaded model. ``max_memory`` and
    ``offload_folder`` go to ``from_pretrained`` (see :func:`amct_hf.offload.offload_kwargs`:
    without a ``device_map`` they imply ``device_map="auto"``)."""
    from transformers import AutoModelForCausalLM
    if isinstance(model, nn.Module):
        if max_memory is not None or offload_folder is not None:
            raise ValueError("max_memory/offload_folder place a model while loading it; this model is "
                             "already loaded (pass its path, or load it with them yourself)")
        if tokenizer is None:
            raise ValueError("a loaded model needs its tokenizer: pass tokenizer=...")
        return model, _tokenizer(tokenizer, trust_remote_code)
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a model id, a local path or a loaded model, got {type(model).__name__}")
    path = os.fspath(model)
    looks_local = os.path.isabs(path) or path.startswith(".") or os.path.exists(path)
    if looks_local and not os.path.isdir(path):
        raise FileNotFoundError(f"model path {path!r} does not exist or is not a directory")
    kwargs = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    kwargs.update(offload_kwargs(device_map, max_memory, offload_folder))
    try:
        tok = _tokenizer(tokenizer if tokenizer is not None else path, trust_remote_code)
        loaded = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise FileNotFoundError(
            f"cannot load model {path!r}: not a local model folder, and it could not be fetched "
            f"(offline?): {err}") from err
    return loaded.eval(), tok


def _tokenizer(tok, trust_remote_code):
    if isinstance(tok, (str, os.PathLike)):
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(os.fspath(tok), trust_remote_code=trust_remote_code)
    if getattr(tok, "pad_token_id", None) is None and getattr(tok, "eos_token_id", None) is not None:
        tok.pad_token = tok.eos_token  # padding is masked out of the statistics anyway
    return tok


def _check_args(seq_len, num_samples, batch_size, tap, mode):
    for name, value in (("seq_len", seq_len), ("num_samples", num_samples), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if tap not in TAPS:
        raise ValueError(f"tap={tap!r} is not supported; use one of {TAPS}")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not supported; use one of {MODES}")


def input_device(model: nn.Module) -> torch.device:
    """Device of the first materialised parameter: where inputs go (device_map models too)."""
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def no_logits_kwargs(model: nn.Module) -> dict:
    """Forward kwargs that spare the LM head: calibration reads K/V only, and logits over
    every position of a large vocabulary can cost a fifth of a small model's forward pass."""
    try:
        accepted = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}


def calibrate_kv_cache(model, dataset, *, record_file="kv_cache.txt", quant_algo_params=None,
                       split="train", text_column="text", num_samples=128, seq_len=2048,
                       batch_size=1, tap="cache", tokenizer=None, device_map=None, dtype=None,
                       trust_remote_code=False, mode="streaming", stream_bins=None, pack=True,
                       range_margin=0.0, progress=True, write=True, max_memory=None,
                       offload_folder=None) -> CalibrationResult:
    """Calibrate INT8 K/V factors of every decoder layer and merge them into ``record_file``.

    ``model``: a model id, a local folder or a loaded model (then pass ``tokenizer``).
    ``dataset``: a ``datasets.Dataset``/``DatasetDict``, a local text/json/jsonl/parquet/csv
    file, a ``datasets.load_dataset`` name, or a list of strings. Texts are packed into
    ``num_samples`` chunks of exactly ``seq_len`` tokens (documents joined by EOS), so no
    padding is needed; ``pack=False`` truncates each text instead and pads batches (padding
    never enters the statistics). ``batch_num`` follows from the data: every layer is
    finalised after the last batch. Under ``accelerate launch``/``torchrun`` samples are split
    between processes and only the main process writes.

    ``range_margin`` widens every calibrated range by that fraction (scales times
    ``1 + range_margin``, offsets unchanged, so zero stays exactly representable): a remedy
    for per-channel ranges fitted on one corpus clipping channels on another.

    ``max_memory`` ({"cpu": "2GiB", 0: "20GiB"}) and ``offload_folder`` (created if
    missing) load a model larger than memory from a path: weights that fit nowhere else are
    offloaded to that folder and streamed in layer by layer. Without ``device_map`` they
    imply ``device_map="auto"``. The factors are the same as with the model in memory.
    """
    started = time.time()
    params = parse_quant_algo_params(quant_algo_params)
    _check_args(seq_len, num_samples, batch_size, tap, mode)
    check_max_memory(max_memory)  # a bad size fails before the dataset is read
    if device_map is None and (max_memory is not None or offload_folder is not None):
        device_map = "auto"  # the only map that reads max_memory and offloads
    if isinstance(range_margin, bool) or not isinstance(range_margin, (int, float)) \
            or not 0 <= range_margin < 10:
        raise ValueError(f"range_margin must be a number in [0, 10), got {range_margin!r}")
    if tap == "proj" and params.per_channel:
        warnings.warn("tap='proj' with per-channel factors calibrates pre-RoPE keys (AMCT's tap); "
                      "applied to the post-RoPE KV cache they can cost much accuracy "
                      "(SmolLM2: perplexity 37.1 -> 117). Prefer tap='cache'.", stacklevel=2)
    texts = load_texts(dataset, split=split, text_column=text_column)
    record_file = os.path.abspath(os.fspath(record_file))
    if write:
        from .record import read_kv_factors
        read_kv_factors(record_file)  # refuse an unparsable record before any work
    from accelerate import PartialState
    state = PartialState(cpu=not torch.cuda.is_available())
    comm = Comm()
    model, tok = load_model(model, device_map=device_map, dtype=dtype,
                            trust_remote_code=trust_remote_code, tokenizer=tokenizer,
                            max_memory=max_memory, offload_folder=offload_folder)
    samples = tokenize_samples(tok, texts, seq_len=seq_len, num_samples=num_samples, pack=pack)
    mine = shard(samples, comm.rank, comm.world_size)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    batches = make_batches(mine, batch_size=batch_size, pad_token_id=pad_id,
                           padding_side=getattr(tok, "padding_side", "right") or "right")
    if device_map is None and state.device.type != "cpu" and input_device(model).type == "cpu":
        model.to(state.device)  # this process's accelerator (one per rank when distributed)
    device = input_device(model)
    collector = LayerCollector(params, mode, stream_bins)
    skip_logits = no_logits_kwargs(model)
    bar = None
    if progress and comm.rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(batches), desc="calibrating", unit="batch")
    with torch.no_grad(), KVCalibrationHooks(model, collector, tap=tap):
        for batch in batches:
            ids = batch["input_ids"].to(device)
            mask = batch["attention_mask"]
            kwargs = {}
            if not bool(mask.all()):
                # positions count real tokens only, so left padding does not shift RoPE;
                # without padding the mask is omitted: no per-batch token selection
                kwargs = {"attention_mask": mask.to(device),
                          "position_ids": (mask.cumsum(-1) - 1).clamp(min=0).to(device)}
            model(input_ids=ids, use_cache=False, **skip_logits, **kwargs)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    factors, tolerance = collector.finalize(comm)
    if range_margin:
        factors = widen_ranges(factors, range_margin)
    _check_complete(model, factors)
    tokens = int(sum(len(s) for s in samples))
    if write and comm.rank == 0:
        write_kv_factors(record_file, factors)
    comm.barrier()
    result = CalibrationResult(record_file, factors, params, len(samples), tokens, time.time() - started,
                               tolerance)
    if comm.rank == 0 and progress:
        print(result.summary())
    return result


def widen_ranges(factors: dict, margin: float) -> dict:
    """Ranges widened by ``margin`` around zero: scale * (1 + margin), offset kept
    (the range is [(-128 - o) s, (127 - o) s], so it scales about 0)."""
    grow = torch.tensor(1.0 + margin, dtype=torch.float32)
    return {name: ([float(torch.tensor(s, dtype=torch.float32) * grow) for s in scales], list(offsets))
            for name, (scales, offsets) in factors.items()}


def _check_complete(model, factors):
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text_config, "num_hidden_layers", None)
    if layers and len(factors) != 2 * layers:
        warnings.warn(f"calibrated {len(factors)} K/V entries for a model with {layers} layers "
                      f"(expected {2 * layers}); some attention layers were not reached", stacklevel=3)
