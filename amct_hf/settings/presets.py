"""Calibration settings per kind (keys, values), and the measured best ones per consumer.

:func:`resolve_kv_settings` turns the arguments of
:func:`~amct_hf.calibrate.calibrate_kv_cache` (``quant_algo_params``,
``value_quant_algo_params``, ``channel_groups``, ``range_margin``, ``target``) into one
:class:`KVSettings`. A ``target`` names the engine that will serve the factors and picks
the configuration measured best for what that engine can load
(``benchmarks/accuracy_smollm2.py``, docs/accuracy.md):

* ``"ascend-c8"``: vllm-ascend / MindIE C8 dequantize with the scale alone and read
  ``[kv_heads * head_dim]`` tensors (the Ascend export repeats a per-tensor scale onto the
  channels). Keys: symmetric. Values: asymmetric, for a model whose attention biases can
  carry the value centres (Llama: the Ascend export folds the offsets into ``v_proj`` /
  ``o_proj`` biases, :mod:`amct_hf.modeling.centering`, and the engine's symmetric
  quantization then computes what the record measures); symmetric otherwise
  (``value_centering=False``, e.g. Qwen2, whose ``o_proj`` has no bias);
* ``"transformers"``: :class:`~amct_hf.modeling.cache.StaticInt8KVCache` takes any
  record, asymmetric included;
* ``"vllm-fp8"``: vLLM's static FP8 KV scales (one per tensor; per head only on
  FlashAttention 3): symmetric, per-tensor HFMG ranges widened by 50%, chosen by
  E4M3-simulated perplexity of the exported checkpoint (docs/serving.md): FP8's relative
  precision rewards little clipping, so a range fitted on the INT8 grid is too tight.

Where a target's general settings were measured not to hold on a model family, the target
takes that family's own (:data:`FAMILY_TARGETS`; the family is read from the model's config,
:func:`model_family`): Gemma 3's QK-normed keys need per-channel ranges.

An argument given explicitly next to a target must agree with what the target sets;
otherwise it is refused naming both, rather than one silently winning.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..algorithms.grouping import CHANNEL_GROUPS
from ..errors import InvalidArgumentError
from .quant_params import QuantParams, parse_quant_algo_params
from .validate import range_margin as check_margin

__all__ = ["TARGETS", "WITHOUT_VALUE_CENTERING", "MODEL_FAMILIES", "FAMILY_TARGETS", "KVSettings", "model_family",
           "resolve_kv_settings"]

KINDS = ("key", "value")

#: target -> what it sets: "key"/"value" quant_algo_params, "channel_groups" and
#: "range_margin" per kind. Measured on SmolLM2-135M (docs/accuracy.md).
TARGETS: dict[str, dict] = {
    # Keys: one symmetric HFMG range per tensor (the export repeats it onto the channels).
    # Values: one asymmetric HFMG range per tensor, served through the bias fold; the
    # symmetric value ranges cost 0.3% perplexity on newsgroups (docs/accuracy.md)
    "ascend-c8": {
        "key": {"act_algo": "hfmg", "asymmetric": False, "quant_granularity": "per_tensor"},
        "value": {"act_algo": "hfmg", "asymmetric": True, "quant_granularity": "per_tensor"},
        "channel_groups": {"key": "channel", "value": "channel"},
        "range_margin": {"key": 0.0, "value": 0.0},
    },
    # any record: HFMG asymmetric per tensor measured best (values need their offset)
    "transformers": {
        "key": {"act_algo": "hfmg", "asymmetric": True, "quant_granularity": "per_tensor"},
        "value": {"act_algo": "hfmg", "asymmetric": True, "quant_granularity": "per_tensor"},
        "channel_groups": {"key": "channel", "value": "channel"},
        "range_margin": {"key": 0.0, "value": 0.0},
    },
    # one symmetric scale per tensor, the HFMG range widened by 50%: measured as served (E4M3,
    # exported scale = range / 448) against HFMG as fitted, +100%, IFMR, IFMR +100% and the
    # uncalibrated scale 1.0 (docs/serving.md "Accuracy as served")
    "vllm-fp8": {
        "key": {"act_algo": "hfmg", "asymmetric": False, "quant_granularity": "per_tensor"},
        "value": {"act_algo": "hfmg", "asymmetric": False, "quant_granularity": "per_tensor"},
        "channel_groups": {"key": "channel", "value": "channel"},
        "range_margin": {"key": 0.5, "value": 0.5},
    },
}

#: a target's settings for a model whose attention cannot carry value centres
WITHOUT_VALUE_CENTERING: dict[str, dict] = {
    # symmetric only. Values: HFMG per channel, widened by 25% -- fitted per channel on a
    # few thousand tokens they clip on other text; per-tensor or per-head symmetric values
    # cost more (docs/accuracy.md)
    "ascend-c8": {
        **TARGETS["ascend-c8"],
        "value": {"act_algo": "hfmg", "asymmetric": False, "quant_granularity": "per_channel"},
        "range_margin": {"key": 0.0, "value": 0.25},
    },
}

#: config ``model_type`` -> the model family whose own measured settings a target takes
MODEL_FAMILIES = {"gemma3": "gemma3", "gemma3_text": "gemma3"}

#: family -> target -> its settings, for the targets whose general settings (above, measured
#: on SmolLM2) were measured not to hold on that family (docs/accuracy.md,
#: ``benchmarks/family_settings.py``). A family's settings must be servable by that
#: family: Gemma 3 has no attention biases, so its ``ascend-c8`` values are symmetric.
FAMILY_TARGETS: dict[str, dict[str, dict]] = {
    # Gemma 3 (QK-norm, one KV head of 256): one key range per tensor spans channels of very
    # different spread, and its grid is too coarse for the narrow ones -- widening the ranges
    # makes it worse, per-channel keys cut the cost most (keys alone cost +0.7% / +0.9%
    # perplexity per tensor)
    "gemma3": {
        # the general settings with keys per channel; values per tensor: per-channel
        # asymmetric values cost more here
        "transformers": {
            **TARGETS["transformers"],
            "key": {"act_algo": "hfmg", "asymmetric": True, "quant_granularity": "per_channel"},
        },
        # the general symmetric settings (no attention biases to fold value centres into:
        # values per channel widened by 25%; per-tensor symmetric values cost more here) with
        # keys per channel
        "ascend-c8": {
            **WITHOUT_VALUE_CENTERING["ascend-c8"],
            "key": {"act_algo": "hfmg", "asymmetric": False, "quant_granularity": "per_channel"},
        },
    },
}


def model_family(config) -> str | None:
    """The family of a model config whose targets have their own settings, else None."""
    return MODEL_FAMILIES.get(getattr(config, "model_type", None))


@dataclass(frozen=True)
class KVSettings:
    """What calibration runs, per kind: ``params[kind]``, ``groups[kind]``."""
    params: dict       # "key"/"value" -> QuantParams
    groups: dict       # "key"/"value" -> one of CHANNEL_GROUPS
    range_margin: dict  # "key"/"value" -> fraction the ranges are widened by
    target: str | None = None
    #: the model family whose own settings the target took (None: the target's general ones)
    family: str | None = None

    def __post_init__(self):
        for kind in KINDS:
            if self.groups[kind] != "channel" and not self.params[kind].per_channel:
                raise InvalidArgumentError(
                    f"channel_groups={self.groups[kind]!r} for the {kind}s needs per-channel factors "
                    "(quant_granularity='per_channel'); a per-tensor record has one range already")

    def to_dict(self) -> dict:
        return {"key": {**self.params["key"].to_dict(), "channel_groups": self.groups["key"]},
                "value": {**self.params["value"].to_dict(), "channel_groups": self.groups["value"]},
                "range_margin": self.range_margin, "target": self.target, "family": self.family}


def _per_kind(name: str, value, default, check) -> dict:
    """One setting for both kinds, or a {"key": ..., "value": ...} dict (missing: default)."""
    if isinstance(value, Mapping):
        if not value or set(value) - set(KINDS):
            raise InvalidArgumentError(f"{name} as a dict takes the keys 'key' and 'value', got {dict(value)!r}")
        out = {kind: value.get(kind, default) for kind in KINDS}
    else:
        out = {kind: default if value is None else value for kind in KINDS}
    for kind, v in out.items():
        check(kind, v)
    return out


def _margins(range_margin) -> dict:
    given = _per_kind("range_margin", range_margin, 0.0, lambda kind, margin: check_margin(margin, kind))
    return {k: float(v) for k, v in given.items()}


def _groups(channel_groups) -> dict:
    if channel_groups is None:
        channel_groups = "channel"
    if isinstance(channel_groups, str):
        channel_groups = {kind: channel_groups for kind in KINDS}
    if not isinstance(channel_groups, Mapping) or set(channel_groups) - set(KINDS):
        raise InvalidArgumentError(f"channel_groups must be one of {CHANNEL_GROUPS} or a dict "
                                   f"{{'key': ..., 'value': ...}}, got {channel_groups!r}")
    out = {kind: channel_groups.get(kind, "channel") for kind in KINDS}
    for kind, groups in out.items():
        if groups not in CHANNEL_GROUPS:
            raise InvalidArgumentError(f"channel_groups for the {kind}s is {groups!r}; use one of "
                                       f"{CHANNEL_GROUPS}")
    return out


def _merge(target: str, kind: str, fixed: dict, given, family: str | None = None) -> QuantParams:
    """The target's params for ``kind`` with the user's fields added; a user field that
    changes what the target sets is refused."""
    if given is None:
        return parse_quant_algo_params(fixed)
    if isinstance(given, QuantParams):
        given = given.to_dict()
    # the user's fields are validated against the algorithm that will run: the target's,
    # unless they name their own (then a conflict is reported below, naming both)
    parse_quant_algo_params(given if "act_algo" in given else {**fixed, **given})
    want = parse_quant_algo_params(fixed).to_dict()
    got = parse_quant_algo_params({**fixed, **given}).to_dict()
    for field in ("act_algo", "asymmetric", "quant_granularity", "num_bits"):
        if got[field] != want[field]:
            hint = ("; value_centering=False (--no-value-centering) gives symmetric values"
                    if target in WITHOUT_VALUE_CENTERING and kind == "value" and field == "asymmetric" else "")
            raise InvalidArgumentError(
                f"target={target!r}{_for(family)} calibrates the {kind}s with {field}={want[field]!r}, but the "
                f"arguments ask for {field}={got[field]!r}; drop the argument or the target{hint}")
    return parse_quant_algo_params({**fixed, **given})


def _for(family: str | None) -> str:
    return f" (for {family} models)" if family else ""


def resolve_kv_settings(target=None, quant_algo_params=None, value_quant_algo_params=None,
                        channel_groups=None, range_margin=0.0, value_centering=True,
                        family: str | None = None) -> KVSettings:
    """The settings of a calibration run (see the module docstring).

    ``value_centering``: whether the model's attention biases can carry value centres
    (:func:`amct_hf.modeling.centering.supports_value_centering`); a target that relies on
    them takes its symmetric settings otherwise. ``family``: the model's family
    (:func:`model_family` of its config); a target with settings of its own for that
    family (:data:`FAMILY_TARGETS`) takes them, and the result names the family.

    Without a target: keys use ``quant_algo_params``, values ``value_quant_algo_params``
    (default: the same); ``channel_groups`` is one grouping for both or a
    ``{"key": ..., "value": ...}`` dict (missing kinds: ``"channel"``); ``range_margin``
    likewise (missing kinds: 0).
    """
    if target is None:
        key = parse_quant_algo_params(quant_algo_params)
        value = key if value_quant_algo_params is None else parse_quant_algo_params(value_quant_algo_params)
        return KVSettings({"key": key, "value": value}, _groups(channel_groups), _margins(range_margin))
    if target not in TARGETS:
        raise InvalidArgumentError(f"target={target!r} is not known; use one of {tuple(TARGETS)}")
    if target in FAMILY_TARGETS.get(family, {}):
        spec = FAMILY_TARGETS[family][target]
    else:
        family = None
        spec = TARGETS[target] if value_centering else WITHOUT_VALUE_CENTERING.get(target, TARGETS[target])
    value_given = quant_algo_params if value_quant_algo_params is None else value_quant_algo_params
    params = {"key": _merge(target, "key", spec["key"], quant_algo_params, family),
              "value": _merge(target, "value", spec["value"], value_given, family)}
    groups = dict(spec["channel_groups"])
    if channel_groups is not None and _groups(channel_groups) != groups:
        raise InvalidArgumentError(f"target={target!r}{_for(family)} sets channel_groups={groups!r}, but the "
                                   f"arguments ask for {channel_groups!r}; drop the argument or the target")
    margins = _margins(spec["range_margin"])
    given = _margins(range_margin)
    if any(given.values()) and given != margins:
        raise InvalidArgumentError(f"target={target!r}{_for(family)} sets range_margin={margins!r}, but "
                                   f"the arguments ask for {range_margin!r}; drop the argument or the target")
    return KVSettings(params, groups, margins, target, family)
