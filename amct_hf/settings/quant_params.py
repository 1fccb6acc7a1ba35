"""Validation of ``quant_algo_params`` (SPEC §2).

Every rejection names the field, the value given and what is allowed, and is
raised before anything is created or written.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import QuantParamsError

__all__ = ["QuantParams", "QuantParamsError", "parse_quant_algo_params", "ALGORITHMS",
           "MAX_IFMR_CANDIDATES"]

ALGORITHMS = ("ifmr", "hfmg")
#: IFMR tries (end - start) / search_step + 1 clips per channel (61 by default); the solve's
#: memory and time grow with that count, so it is bounded where the parameters are checked
MAX_IFMR_CANDIDATES = 10_001
_COMMON = ("act_algo", "num_bits", "with_offset", "asymmetric", "quant_granularity", "batch_num")
_IFMR_ONLY = ("max_percentile", "min_percentile", "search_range", "search_step")
_HFMG_ONLY = ("num_of_bins",)
_BINS = (1024, 2048, 4096, 8192)
_GRANULARITY = {
    0: "per_tensor", "0": "per_tensor", "per_tensor": "per_tensor",
    1: "per_channel", "1": "per_channel", "per_channel": "per_channel",
}


@dataclass(frozen=True)
class QuantParams:
    act_algo: str = "ifmr"
    num_bits: int = 8
    asymmetric: bool = True
    per_channel: bool = False
    batch_num: int = 1
    max_percentile: float = 0.999999
    min_percentile: float = 0.999999
    search_range: tuple = (0.7, 1.3)
    search_step: float = 0.01
    num_of_bins: int = 4096

    @property
    def granularity(self) -> str:
        return "per_channel" if self.per_channel else "per_tensor"

    def to_dict(self) -> dict:
        """The canonical ``quant_algo_params`` dict that reproduces these parameters."""
        out = {
            "act_algo": self.act_algo,
            "num_bits": self.num_bits,
            "asymmetric": self.asymmetric,
            "quant_granularity": self.granularity,
            "batch_num": self.batch_num,
        }
        if self.act_algo == "ifmr":
            out.update(max_percentile=self.max_percentile, min_percentile=self.min_percentile,
                       search_range=list(self.search_range), search_step=self.search_step)
        else:
            out["num_of_bins"] = self.num_of_bins
        return out


def _fail(name: str, value: Any, allowed: str) -> QuantParamsError:
    return QuantParamsError(
        f"quant_algo_params[{name!r}] = {value!r} is not allowed: expected {allowed}")


def _is_real(value: Any) -> bool:
    # bool is an int subclass in Python; a flag is never a number here
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(name, value, "a bool (true or false)")
    return value


def _check_percentile(name: str, value: Any) -> float:
    if not _is_real(value) or not math.isfinite(value) or not 0.5 < value <= 1.0:
        raise _fail(name, value, "a number in (0.5, 1]")
    return float(value)


def parse_quant_algo_params(params: Mapping[str, Any] | None) -> QuantParams:
    """Check ``params`` against SPEC §2 and return the resolved :class:`QuantParams`."""
    if params is None:
        params = {}
    if isinstance(params, QuantParams):
        # a hand-built QuantParams gets the same checks as the dict it stands for
        return parse_quant_algo_params(params.to_dict())
    if not isinstance(params, Mapping):
        raise QuantParamsError(
            f"quant_algo_params must be a dict or None, got {type(params).__name__}: {params!r}")
    for key in params:
        if not isinstance(key, str):
            raise QuantParamsError(f"quant_algo_params has a non-string key {key!r}")

    algo = params.get("act_algo", "ifmr")
    if algo not in ALGORITHMS:
        raise _fail("act_algo", algo, "one of 'ifmr', 'hfmg'")
    own, other = (_IFMR_ONLY, _HFMG_ONLY) if algo == "ifmr" else (_HFMG_ONLY, _IFMR_ONLY)
    for key, value in params.items():
        if key in other:
            raise QuantParamsError(
                f"quant_algo_params[{key!r}] = {value!r} belongs to "
                f"{'HFMG' if algo == 'ifmr' else 'IFMR'}, but act_algo is {algo!r}; "
                f"fields allowed with {algo!r}: {', '.join(_COMMON + own)}")
        if key not in _COMMON and key not in own:
            raise QuantParamsError(
                f"quant_algo_params has unknown field {key!r} (value {value!r}); "
                f"fields allowed with {algo!r}: {', '.join(_COMMON + own)}")

    kw: dict[str, Any] = {"act_algo": algo}
    if "num_bits" in params:
        value = params["num_bits"]
        if not (isinstance(value, int) and not isinstance(value, bool)) or value != 8:
            raise _fail("num_bits", value, "the int 8 (only INT8 is supported)")
    asym = True
    if "with_offset" in params:
        asym = _check_bool("with_offset", params["with_offset"])
    if "asymmetric" in params:  # wins over with_offset (SPEC §2)
        asym = _check_bool("asymmetric", params["asymmetric"])
    kw["asymmetric"] = asym
    if "quant_granularity" in params:
        value = params["quant_granularity"]
        key = value if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)) else None
        if key not in _GRANULARITY:
            raise _fail("quant_granularity", value,
                        "0, '0' or 'per_tensor' (per-tensor); 1, '1' or 'per_channel' (per-channel)")
        kw["per_channel"] = _GRANULARITY[key] == "per_channel"
    if "batch_num" in params:
        value = params["batch_num"]
        if not (isinstance(value, int) and not isinstance(value, bool)) or value <= 0:
            raise _fail("batch_num", value, "an int > 0")
        kw["batch_num"] = value

    if algo == "ifmr":
        for name in ("max_percentile", "min_percentile"):
            if name in params:
                kw[name] = _check_percentile(name, params[name])
        start, end = 0.7, 1.3
        if "search_range" in params:
            value = params["search_range"]
            if (not isinstance(value, (list, tuple)) or len(value) != 2
                    or not all(_is_real(v) and math.isfinite(v) for v in value)
                    or not 0 < value[0] < value[1]):
                raise _fail("search_range", value, "two numbers [start, end] with 0 < start < end")
            start, end = float(value[0]), float(value[1])
            kw["search_range"] = (start, end)
        if "search_step" in params:
            value = params["search_step"]
            if not _is_real(value) or not math.isfinite(value) or not 0 < value <= end - start:
                raise _fail("search_step", value,
                            f"a number in (0, search_range end - start] = (0, {end - start:g}]")
            kw["search_step"] = float(value)
        elif 0.01 > end - start:
            raise _fail("search_range", list(params["search_range"]),
                        "a range wider than the default search_step 0.01 (or set search_step)")
        step = kw.get("search_step", 0.01)
        candidates = int((end - start) / step) + 1
        if candidates > MAX_IFMR_CANDIDATES:
            name = "search_step" if "search_step" in params else "search_range"
            raise _fail(name, params[name],
                        f"at most {MAX_IFMR_CANDIDATES} candidate clips, (end - start) / "
                        f"search_step + 1; this gives {candidates}")
    else:
        if "num_of_bins" in params:
            value = params["num_of_bins"]
            if not (isinstance(value, int) and not isinstance(value, bool)) or value not in _BINS:
                raise _fail("num_of_bins", value, "one of 1024, 2048, 4096, 8192")
            kw["num_of_bins"] = value
    return QuantParams(**kw)
