"""calibrate_kv_cache: one call from a model and a dataset to a record of K/V factors.

Samples are split between processes (``accelerate launch`` / ``torchrun``); every
layer's statistics are reduced across processes once, after the last batch, then the
algorithm runs and the main process writes the record. With the default
``mode="streaming"`` the statistics are bounded-memory aligned histograms (see
:mod:`amct_hf.observers.streaming`); ``mode="exact"`` keeps every value and gives exactly
the factors of a ``QuantCalibrationOp`` fed all samples as one batch. In both modes the
factors depend only on the set of calibration tokens, not on batch size, batch order
or the number of processes.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .data.samples import load_texts, make_batches, shard, tokenize_samples, use_chat_template
from .distributed import Comm
from .errors import CalibrationInputError, InvalidArgumentError
from .modeling.attention import KVCalibrationHooks, KVStatesComplete
from .modeling.centering import model_config, supports_value_centering
from .modeling.layout import check_record_editable
from .modeling.loading import input_device, load_model, no_logits_kwargs, text_config
from .modeling.placement import check_max_memory
from .naming import layer_kind, record_order
from .observers.kv import KVBank
from .observers.streaming import check_grid_bins
from .record.files import check_record_file, write_kv_factors
from .settings.options import DRIVER_MODES, CalibrationSettings, DataOptions, LoadOptions, QuantOptions
from .settings.presets import KVSettings, model_family, resolve_kv_settings
from .settings.quant_params import QuantParams
from .settings.validate import lock_timeout_seconds

__all__ = ["calibrate_kv_cache", "CalibrationResult", "DRIVER_MODES", "options_from_keywords", "resolve_calibration",
           "widen_ranges"]

logger = logging.getLogger("amct_hf")


@dataclass
class CalibrationResult(Mapping):
    """Factors per record key (``model.layers.{i}.self_attn.k_proj`` ...) and where they
    went; a read-only mapping record key -> (scales, offsets)."""
    record_file: str
    factors: dict  # layer -> (scales list[float], offsets list[int])
    params: QuantParams
    num_samples: int
    num_tokens: int
    seconds: float
    tolerance: dict = field(default_factory=dict)  # layer -> IFMR streaming bound (max over channels)
    #: what fell short of the request (fewer or shorter samples than asked), or None
    shortfall: str | None = None
    #: the settings per kind (``params`` is the keys'), target and channel groups
    settings: KVSettings | None = None
    #: whether the texts were rendered through the tokenizer's chat template
    chat_template: bool = False

    def __getitem__(self, layer):
        return self.factors[layer]

    def __iter__(self):
        return iter(self.factors)

    def __len__(self):
        return len(self.factors)

    def summary(self) -> str:
        """A table (layer, channels, scale and offset ranges; one value each for
        per-tensor records), then one line of totals."""
        per_tensor = all(len(s) == 1 for s, _ in self.factors.values())
        if per_tensor:
            rows = [("layer", "scale", "offset")]
            rows += [(n, f"{s[0]:.6g}", str(o[0])) for n, (s, o) in self.factors.items()]
        else:
            rows = [("layer", "ch", "scale min", "scale max", "offset min", "offset max")]
            rows += [(n, str(len(s)), f"{min(s):.6g}", f"{max(s):.6g}", str(min(o)), str(max(o)))
                     for n, (s, o) in self.factors.items()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(self.totals())
        if self.shortfall:
            lines.append(f"warning: {self.shortfall}")
        return "\n".join(lines)

    def totals(self) -> str:
        layers = len({n.rpartition(".")[0] for n in self.factors})
        samples = f"{self.num_samples} sample{'s' if self.num_samples != 1 else ''}"
        text = "chat-template text" if self.chat_template else "plain text"
        return (f"{len(self.factors)} K/V entries ({layers} attention layers), {samples}, "
                f"{self.num_tokens} tokens of {text}, {self.seconds:.1f} s -> {self.record_file}")


def _shortfall(samples, num_samples, seq_len) -> str | None:
    short = [len(s) for s in samples if len(s) < seq_len]
    if len(samples) >= num_samples and not short:
        return None
    got = sum(len(s) for s in samples)
    return (f"asked for {num_samples} x {seq_len} tokens, the text gave {len(samples)} sample(s), "
            f"{got} tokens in all; use more text or a smaller --seq-len/--num-samples")


def calibrate_kv_cache(model, dataset, *, record_file="kv_cache.txt", quant_algo_params=None,
                       split="train", text_column="text", num_samples=128, seq_len=2048,
                       batch_size=1, tap="cache", tokenizer=None, device_map=None, dtype=None,
                       trust_remote_code=False, mode="streaming", stream_bins=None, pack=True,
                       range_margin=0.0, progress=True, write=True, lock_timeout=None,
                       max_memory=None, offload_folder=None, value_quant_algo_params=None,
                       channel_groups=None, target=None, value_centering=True, chat_template=False,
                       settings: CalibrationSettings | None = None) -> CalibrationResult:
    """Calibrate INT8 K/V factors of every decoder layer and merge them into ``record_file``.

    ``model``: a model id, a local folder or a loaded model (then pass ``tokenizer``).
    ``dataset``: a ``datasets.Dataset``/``DatasetDict``, a local text/json/jsonl/parquet/csv
    file, a ``datasets.load_dataset`` name, or a list of strings. Texts are packed into
    ``num_samples`` chunks of exactly ``seq_len`` tokens (documents joined by EOS), so no
    padding is needed; ``pack=False`` truncates each text instead and pads batches (padding
    never enters the statistics). Too little text still calibrates on what there is; the
    result's ``shortfall`` (also in its summary) says what was missing.
    ``batch_num`` follows from the data: every layer is finalised after the last batch.
    Under ``accelerate launch``/``torchrun`` samples are split between processes and only
    the main process writes.

    The first batch that carries NaN or Inf into any layer stops the run with a
    :class:`~amct_hf.errors.CalibrationInputError` naming the layer and the batch; nothing
    is written.

    ``lock_timeout``: seconds the record write waits for another writer's lock (None:
    forever); past it a :class:`~amct_hf.errors.RecordFileError` names the lock file.

    ``range_margin`` widens every calibrated range by that fraction (scales times
    ``1 + range_margin``, offsets unchanged, so zero stays exactly representable): a remedy
    for per-channel ranges fitted on one corpus clipping channels on another. It may be a
    ``{"key": ..., "value": ...}`` dict.

    ``value_quant_algo_params``: the values' own parameters (default: ``quant_algo_params``).
    ``channel_groups``: ``"channel"`` (default, AMCT's one range per channel),
    ``"rope_pair"`` (one range per RoPE pair ``d``/``d + head_dim/2`` of a head) or
    ``"head"`` (one per KV head), for both kinds or as ``{"key": ..., "value": ...}``; the
    record still has ``kv_heads * head_dim`` entries (see :mod:`amct_hf.algorithms.grouping`).
    ``target``: ``"ascend-c8"``, ``"transformers"`` or ``"vllm-fp8"`` picks the measured
    best settings for that engine (:mod:`amct_hf.settings.presets`); explicit arguments that
    contradict it are refused. ``"ascend-c8"`` calibrates asymmetric values for a model
    whose attention biases can carry the value centres (Llama, read from its config before
    anything else) and symmetric ones otherwise (Qwen2); ``value_centering=False`` asks for
    the symmetric settings on any model (for an engine that does not read
    ``attention_bias``). A model family with settings of its own for the target (Gemma 3,
    read from the config; :data:`amct_hf.settings.presets.FAMILY_TARGETS`) takes them, and
    the result's ``settings.family`` names it.

    ``chat_template``: render every text through the tokenizer's chat template before
    packing (True), as one user turn (its first half) and one assistant turn (the rest),
    or a conversation entry (a ``messages`` column, ``text_column="messages"``) as it is;
    ``"auto"``: when the tokenizer has a template. True with a tokenizer without one is a
    one-line :class:`~amct_hf.errors.DatasetError` before any forward pass. The result's
    ``chat_template`` (and its summary line) says which text was used.

    ``settings``: the result of :func:`resolve_calibration` (the command line resolves
    once, early, and hands it over); then the keywords it resolves stay at their defaults.

    ``max_memory`` ({"cpu": "2GiB", 0: "20GiB"}) and ``offload_folder`` (created if
    missing) load a model larger than memory from a path: weights that fit nowhere else are
    offloaded to that folder and streamed in layer by layer. Without ``device_map`` they
    imply ``device_map="auto"``. The factors are the same as with the model in memory.
    """
    started = time.time()
    facade = dict(quant_algo_params=quant_algo_params, split=split, text_column=text_column,
                  num_samples=num_samples, seq_len=seq_len, batch_size=batch_size, tap=tap,
                  tokenizer=tokenizer, device_map=device_map, dtype=dtype,
                  trust_remote_code=trust_remote_code, mode=mode, stream_bins=stream_bins, pack=pack,
                  range_margin=range_margin, max_memory=max_memory, offload_folder=offload_folder,
                  value_quant_algo_params=value_quant_algo_params, channel_groups=channel_groups,
                  target=target, value_centering=value_centering, chat_template=chat_template)
    if settings is None:
        settings = resolve_calibration(model, **options_from_keywords(**facade))
    else:
        given = sorted(k for k, v in facade.items() if v is not _FACADE_DEFAULTS[k] and v != _FACADE_DEFAULTS[k])
        if given:
            raise InvalidArgumentError(f"pass either settings= or the keywords it resolves, not both (got {given})")
    quant, data, load = settings.quant, settings.data, settings.load
    params, margins = settings.kv.params["key"], settings.kv.range_margin
    lock_timeout = lock_timeout_seconds(lock_timeout)
    device_map = load.device_map
    if device_map is None and (load.max_memory is not None or load.offload_folder is not None):
        device_map = "auto"  # the only map that reads max_memory and offloads
    texts = load_texts(dataset, split=data.split, text_column=data.text_column,
                       messages=data.chat_template is not False)
    record_file = os.path.abspath(os.fspath(record_file))
    if write:
        check_record_file(record_file)  # refuse a record the write would refuse, before any work
    from accelerate import PartialState
    state = PartialState(cpu=not torch.cuda.is_available())
    comm = Comm()
    model, tok = load_model(model, device_map=device_map, dtype=load.dtype,
                            trust_remote_code=load.trust_remote_code, tokenizer=load.tokenizer,
                            max_memory=load.max_memory, offload_folder=load.offload_folder)
    if write:
        check_record_editable(record_file, model)  # the model's keys are known now, not the factors
    chat = use_chat_template(tok, data.chat_template)  # a missing template fails before any forward
    _warn_long_context(model, data.seq_len)
    logger.info("model %s loaded (%s, %s)", type(model).__name__, input_device(model),
                next(model.parameters()).dtype)
    samples = tokenize_samples(tok, texts, seq_len=data.seq_len, num_samples=data.num_samples, pack=data.pack,
                               chat_template=chat)
    mine = shard(samples, comm.rank, comm.world_size)
    logger.info("%d calibration sample(s), %d on process %d of %d; %s %s, %s mode, tap=%s",
                len(samples), len(mine), comm.rank, comm.world_size, params.act_algo,
                params.granularity, quant.mode, quant.tap)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    batches = make_batches(mine, batch_size=data.batch_size, pad_token_id=pad_id,
                           padding_side=getattr(tok, "padding_side", "right") or "right")
    if device_map is None and state.device.type != "cpu" and input_device(model).type == "cpu":
        model.to(state.device)  # this process's accelerator (one per rank when distributed)
    bins = quant.stream_bins
    # the token count over all processes sizes the exact IFMR extremes; on an accelerator the
    # NaN/Inf checks stay on the device until check_pending() (no host sync per batch)
    bank = KVBank(settings.kv.params, quant.mode, settings.kv.groups, head_dim=_head_dim(model),
                  tokens=int(sum(len(s) for s in samples)), defer_checks=True,
                  **({"bins": bins} if bins and quant.mode == "streaming" else {}))
    failure = _observe(model, batches, bank, quant.tap, show_progress=progress and comm.rank == 0)
    if comm.any(failure is not None):
        raise failure or CalibrationInputError(
            "another process stopped on an unusable activation (its error names the layer); "
            "nothing was written")
    solve_started = time.time()
    factors, tolerance = bank.finalize_all(comm, order=record_order)
    logger.info("solved %d K/V entries in %.2f s", len(factors), time.time() - solve_started)
    if any(margins.values()):
        factors = {name: widen_ranges({name: f}, margins[layer_kind(name)])[name] for name, f in factors.items()}
    _check_complete(model, factors)
    tokens = int(sum(len(s) for s in samples))
    if write and comm.rank == 0:
        write_kv_factors(record_file, factors, lock_timeout=lock_timeout)
        logger.info("merged %d K/V entries into %s", len(factors), record_file)
    comm.barrier()
    return CalibrationResult(record_file, factors, params, len(samples), tokens, time.time() - started,
                             tolerance, _shortfall(samples, data.num_samples, data.seq_len), settings.kv, chat)


def _observe(model, batches, bank, tap: str, show_progress: bool) -> CalibrationInputError | None:
    """Run every batch through the model with its K/V routed into ``bank``; the first
    unusable activation stops the loop and is returned (not raised), so the caller can
    tell the other processes before anyone raises and nobody hangs."""
    device = input_device(model)
    skip_logits = no_logits_kwargs(model)
    bar = None
    if show_progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(batches), desc="calibrating", unit="batch")
    try:
        # The forward stops once the last layer's K/V are observed, except under accelerate's
        # dispatch hooks: their post-forward (offloading weights back) must run.
        dispatched = any(hasattr(m, "_hf_hook") for m in model.modules())
        with torch.no_grad(), KVCalibrationHooks(model, bank, tap=tap, stop_when_complete=not dispatched):
            for batch in batches:
                ids = batch["input_ids"].to(device)
                mask = batch["attention_mask"]
                kwargs = {}
                if not bool(mask.all()):
                    # positions count real tokens only, so left padding does not shift RoPE;
                    # without padding the mask is omitted: no per-batch token selection
                    kwargs = {"attention_mask": mask.to(device),
                              "position_ids": (mask.cumsum(-1) - 1).clamp(min=0).to(device)}
                try:
                    model(input_ids=ids, use_cache=False, **skip_logits, **kwargs)
                except KVStatesComplete:
                    pass
                if bar is not None:
                    bar.update(1)
            bank.check_pending()
    except CalibrationInputError as err:
        return err
    finally:
        if bar is not None:
            bar.close()
    return None


def options_from_keywords(*, quant_algo_params=None, split="train", text_column="text", num_samples=128,
                          seq_len=2048, batch_size=1, tap="cache", tokenizer=None, device_map=None,
                          dtype=None, trust_remote_code=False, mode="streaming", stream_bins=None,
                          pack=True, range_margin=0.0, max_memory=None, offload_folder=None,
                          value_quant_algo_params=None, channel_groups=None, target=None,
                          value_centering=True, chat_template=False) -> dict:
    """:func:`calibrate_kv_cache`'s keywords sorted into the three option objects
    (``{"quant": ..., "data": ..., "load": ...}``, each validated as it is built)."""
    return {"quant": QuantOptions(target, quant_algo_params, value_quant_algo_params, channel_groups,
                                  range_margin, value_centering, tap, mode, stream_bins),
            "data": DataOptions(split, text_column, num_samples, seq_len, batch_size, pack, chat_template),
            "load": LoadOptions(device_map, dtype, trust_remote_code, max_memory, offload_folder, tokenizer)}


_FACADE_DEFAULTS = {name: p.default for name, p in inspect.signature(options_from_keywords).parameters.items()}


def resolve_calibration(model, quant: QuantOptions | None = None, data: DataOptions | None = None,
                        load: LoadOptions | None = None) -> CalibrationSettings:
    """The settings of one calibration, resolved once for ``model`` (a loaded model, an id
    or a folder -- read from its config alone -- or None for the bundled SmolLM2): a
    target's settings depend on whether the model's attention biases can carry value
    centres and on the model's family (:func:`amct_hf.settings.presets.model_family`).
    Everything that can be refused without the weights is refused here."""
    quant, data, load = quant or QuantOptions(), data or DataOptions(), load or LoadOptions()
    value_centering, family = quant.value_centering, None
    if quant.target is not None and model is not None:
        config = model_config(model, load.trust_remote_code)  # no weights read
        if config is not None:
            value_centering = value_centering and supports_value_centering(config)
            family = model_family(config)
    kv = resolve_kv_settings(quant.target, quant.quant_algo_params, quant.value_quant_algo_params,
                             quant.channel_groups, quant.range_margin, value_centering, family)
    quant = dataclasses.replace(quant, stream_bins=check_grid_bins(quant.stream_bins))
    check_max_memory(load.max_memory)  # a bad size fails before the dataset is read
    if quant.tap == "proj" and (kv.params["key"].per_channel or kv.params["value"].per_channel):
        warnings.warn("tap='proj' with per-channel factors calibrates pre-RoPE keys (AMCT's tap); "
                      "applied to the post-RoPE KV cache they can cost much accuracy "
                      "(SmolLM2: perplexity 37.1 -> 117). Prefer tap='cache'.", stacklevel=3)
    return CalibrationSettings(kv, quant, data, load)


def widen_ranges(factors: dict, margin: float) -> dict:
    """Ranges widened by ``margin`` around zero: scale * (1 + margin), offset kept
    (the range is [(-128 - o) s, (127 - o) s], so it scales about 0)."""
    grow = torch.tensor(1.0 + margin, dtype=torch.float32)
    return {name: ([float(torch.tensor(s, dtype=torch.float32) * grow) for s in scales], list(offsets))
            for name, (scales, offsets) in factors.items()}


def _head_dim(model) -> int | None:
    cfg = text_config(model)
    heads = getattr(cfg, "num_attention_heads", None)
    return getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else None)


def _warn_long_context(model, seq_len):
    limit = getattr(text_config(model), "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        warnings.warn(f"seq_len={seq_len} exceeds the model's max_position_embeddings={limit}: "
                      "positions past it were never trained, so their K/V statistics are not "
                      "what serving sees", stacklevel=3)


def _check_complete(model, factors):
    layers = getattr(text_config(model), "num_hidden_layers", None)
    if layers and len(factors) != 2 * layers:
        warnings.warn(f"calibrated {len(factors)} K/V entries for a model with {layers} layers "
                      f"(expected {2 * layers}); some attention layers were not reached", stacklevel=3)
