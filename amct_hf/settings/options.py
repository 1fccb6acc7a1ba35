"""The few option objects one calibration (or evaluation) is described by, and the
resolved settings the driver, the command line and the benchmarks share.

``calibrate_kv_cache``'s keyword arguments are a thin facade over these: each keyword
lands in exactly one of :class:`LoadOptions` (where the model comes from and how it is
placed), :class:`DataOptions` (which text, how much of it) and :class:`QuantOptions`
(what is measured and solved). Each object validates its own fields when it is built,
so a bad value is refused before any model or text is read.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidArgumentError
from .presets import KVSettings
from .validate import positive_int

__all__ = ["LoadOptions", "DataOptions", "QuantOptions", "CalibrationSettings", "TAPS", "DRIVER_MODES",
           "CHAT_TEMPLATE_CHOICES", "check_chat_template_option"]

#: where K/V are read: as the KV cache stores them (post-RoPE) or as k_proj/v_proj emit them
TAPS = ("cache", "proj")
#: bounded-memory histograms, or every value kept (AMCT's exact factors for any count)
DRIVER_MODES = ("streaming", "exact")
#: the values of the chat-template option: off, on (the tokenizer must have a template),
#: or on exactly when the tokenizer has one
CHAT_TEMPLATE_CHOICES = (False, True, "auto")


def check_chat_template_option(value, error=InvalidArgumentError):
    """``value`` if it is one of :data:`CHAT_TEMPLATE_CHOICES`, else a one-line ``error``."""
    if not any(value is c if isinstance(c, bool) else value == c for c in CHAT_TEMPLATE_CHOICES):
        raise error(f"chat_template must be True, False or 'auto', got {value!r}")
    return value


@dataclass(frozen=True)
class LoadOptions:
    """How the model is loaded when it is given as an id or a folder."""

    device_map: Any = None
    dtype: Any = None
    trust_remote_code: bool = False
    max_memory: Mapping | None = None
    offload_folder: str | None = None
    tokenizer: Any = field(default=None, repr=False)


@dataclass(frozen=True)
class DataOptions:
    """Which text, and how it becomes samples: ``num_samples`` packed chunks of exactly
    ``seq_len`` tokens (``pack=False``: one truncated text per sample, padded batches).
    ``chat_template``: render every text through the tokenizer's chat template first
    (True), not (False), or when the tokenizer has one ("auto");
    :func:`amct_hf.data.samples.tokenize_samples`."""

    split: str = "train"
    text_column: str = "text"
    num_samples: int = 128
    seq_len: int = 2048
    batch_size: int = 1
    pack: bool = True
    chat_template: bool | str = False

    def __post_init__(self):
        for name in ("num_samples", "seq_len", "batch_size"):
            positive_int(name, getattr(self, name))
        check_chat_template_option(self.chat_template)

    @property
    def num_tokens(self) -> int:
        """The most tokens these options can give (samples x length)."""
        return self.num_samples * self.seq_len


@dataclass(frozen=True)
class QuantOptions:
    """What is calibrated: a ``target`` (the engine the factors are for) or explicit
    ``quant_algo_params`` (and the values' own), channel grouping, range margin, the tap
    and the statistics mode."""

    target: str | None = None
    quant_algo_params: Mapping | None = None
    value_quant_algo_params: Mapping | None = None
    channel_groups: Any = None
    range_margin: Any = 0.0
    value_centering: bool = True
    tap: str = "cache"
    mode: str = "streaming"
    stream_bins: int | None = None

    def __post_init__(self):
        if self.tap not in TAPS:
            raise InvalidArgumentError(f"tap={self.tap!r} is not supported; use one of {TAPS}")
        if self.mode not in DRIVER_MODES:
            raise InvalidArgumentError(f"mode={self.mode!r} is not supported; use one of {DRIVER_MODES}")
        if not isinstance(self.value_centering, bool):
            raise InvalidArgumentError(f"value_centering must be True or False, got {self.value_centering!r}")


@dataclass(frozen=True)
class CalibrationSettings:
    """Everything one calibration runs with, resolved once (for the model at hand) and
    then only read: the per-kind settings (:class:`~amct_hf.settings.presets.KVSettings`)
    and the options they came from."""

    kv: KVSettings
    quant: QuantOptions
    data: DataOptions
    load: LoadOptions
