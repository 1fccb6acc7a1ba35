"""One validator per kind of value the public functions take, so every entry point
(library, command line, recipes) refuses a bad value with the same one-line message."""
from __future__ import annotations

import math
import re

from ..errors import InvalidArgumentError

__all__ = ["positive_int", "range_margin", "lock_timeout_seconds", "size_in_bytes", "MAX_RANGE_MARGIN"]

#: a range widened by 10x or more is no calibration at all
MAX_RANGE_MARGIN = 10.0

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)
# decimal units as transformers and accelerate count them ("5GB" = 5 * 10**9), binary with "i"
_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40,
          "K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "T": 10 ** 12}


def positive_int(name: str, value, error: type[Exception] = InvalidArgumentError) -> int:
    """``value`` if it is an int > 0 (not a bool); otherwise ``error`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise error(f"{name} must be a positive integer, got {value!r}")
    return value


def range_margin(value, kind: str | None = None) -> float:
    """A fraction in [0, MAX_RANGE_MARGIN) the calibrated ranges are widened by."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < MAX_RANGE_MARGIN:
        where = f" for the {kind}s" if kind else ""
        raise InvalidArgumentError(f"range_margin must be a number in [0, {MAX_RANGE_MARGIN:g}), "
                                   f"got {value!r}{where}")
    return float(value)


def lock_timeout_seconds(lock_timeout) -> float | None:
    """Validated ``lock_timeout``: None (or a negative number) waits forever."""
    if lock_timeout is None:
        return None
    if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, (int, float)) \
            or math.isnan(lock_timeout):
        raise InvalidArgumentError(f"lock_timeout must be a number of seconds or None, got {lock_timeout!r}")
    return None if lock_timeout < 0 else float(lock_timeout)


def size_in_bytes(size, what: str, error: type[Exception] = InvalidArgumentError, *,
                  allow_zero: bool = False) -> int:
    """Bytes from an int or a size string: ``"5GB"`` (10**9), ``"4GiB"`` (2**30), ``"200MB"``."""
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise error(f"{what} = {size!r}: give bytes (int) or a size such as '2GiB'")
    if isinstance(size, int):
        n = size
    else:
        m = _SIZE.match(size)
        unit = m.group(2).upper() if m else None
        if not m or unit not in _UNITS:
            raise error(f"{what} = {size!r}: not a size; use e.g. '2GiB', '500MB' or bytes")
        n = int(float(m.group(1)) * _UNITS[unit])
    if n < 0 or (n == 0 and not allow_zero):
        raise error(f"{what} = {size!r}: a size must be {'non-negative' if allow_zero else 'positive'}")
    return n
