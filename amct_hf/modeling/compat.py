"""The transformers versions amct_hf supports, checked when its transformers-facing parts
(:mod:`amct_hf.modeling`, hence calibration, evaluation, the INT8 cache and the model
exports) are imported.

Only the versions the test suite runs on are declared (``pyproject.toml``, the pin in
``constraints.txt``): amct_hf hooks transformers' attention interface and subclasses its
cache layers, and those internals change between minor versions (5.0 has no
``cache_utils.get_layer_types_and_kwargs``; 4.57's cache layers take another
``lazy_initialization`` signature). A version outside the range is refused at import
with one line naming the installed and the required versions, instead of failing later
deep inside a forward pass.
"""
from __future__ import annotations

import re

from ..errors import DependencyVersionError

__all__ = ["TRANSFORMERS_MIN", "TRANSFORMERS_BELOW", "TRANSFORMERS_REQUIREMENT",
           "transformers_version_problem", "check_transformers_version"]

TRANSFORMERS_MIN = (5, 24)    # the constraints pin 5.24.0: the oldest version tested
TRANSFORMERS_BELOW = (6, 0)   # a new major version is not assumed to keep the internals used
TRANSFORMERS_REQUIREMENT = "transformers>=5.24,<6"


def _release(version: str) -> tuple[int, int] | None:
    m = re.match(r"\s*v?(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def transformers_version_problem(installed: str | None) -> str | None:
    """Why ``installed`` (a transformers version string, None: not installed) cannot be
    used, or None."""
    if installed is None:
        return f"transformers is not installed; amct_hf needs {TRANSFORMERS_REQUIREMENT}"
    release = _release(installed)
    if release is None or not TRANSFORMERS_MIN <= release < TRANSFORMERS_BELOW:
        return (f"transformers {installed} is installed, but amct_hf needs {TRANSFORMERS_REQUIREMENT} "
                f"(the versions its tests run on): pip install '{TRANSFORMERS_REQUIREMENT}'")
    return None


def check_transformers_version(installed: str | None = ...) -> None:
    """Raise :class:`~amct_hf.errors.DependencyVersionError` (one line) unless the installed
    transformers (or ``installed``, a version string) is supported."""
    if installed is ...:
        from importlib.metadata import PackageNotFoundError, version
        try:
            installed = version("transformers")
        except PackageNotFoundError:
            installed = None
    problem = transformers_version_problem(installed)
    if problem:
        raise DependencyVersionError(problem)
