"""Loading a model larger than memory: ``max_memory`` and ``offload_folder`` for
``from_pretrained``, checked before anything is loaded.

Both only mean something with a ``device_map``: given without one, ``device_map="auto"``
is implied (the only map that reads ``max_memory``), so ``max_memory={"cpu": "2GiB"}``
alone spreads the model over the devices, then the CPU up to 2 GiB, then the disk.
"""
from __future__ import annotations

import os
import re

from ..errors import ModelLoadError
from ..settings.validate import size_in_bytes

__all__ = ["check_max_memory", "offload_kwargs", "parse_max_memory"]

# accelerate's device names besides integer (GPU/XPU/NPU) indices
_NAMED_DEVICES = ("cpu", "disk", "mps")
# the units accelerate's convert_file_size_to_int reads
_ACCELERATE_UNITS = re.compile(r"^\d+(\.\d+)?\s*(GIB|MIB|KIB|GB|MB|KB)$", re.IGNORECASE)


def _device_key(key):
    if isinstance(key, bool):
        raise ModelLoadError(f"max_memory: device {key!r} is not a device "
                             f"(use an int index, 'cpu', 'disk' or 'mps')")
    if isinstance(key, int):
        if key < 0:
            raise ModelLoadError(f"max_memory: device index {key} is negative")
        return key
    if isinstance(key, str):
        name = key.strip().lower()
        if name.isdigit():
            return int(name)
        if name in _NAMED_DEVICES:
            return name
    raise ModelLoadError(f"max_memory: unknown device {key!r}; use an int index (0, 1, ...), "
                         f"'cpu', 'disk' or 'mps'")


def _size(device, value):
    what = f"max_memory[{device!r}]"
    size_in_bytes(value, what, ModelLoadError, allow_zero=True)
    if isinstance(value, int):
        return value
    text = value.strip()
    if text.isdigit():
        return int(text)
    if not _ACCELERATE_UNITS.match(text):
        raise ModelLoadError(f"{what} = {value!r}: not a size; use e.g. '2GiB', '500MB' or bytes")
    return text.replace(" ", "")


def check_max_memory(max_memory) -> dict | None:
    """``max_memory`` as ``from_pretrained`` wants it ({0: "20GiB", "cpu": "2GiB"}), checked:
    device keys are int indices (or their digit strings) or 'cpu'/'disk'/'mps', values are
    bytes or sizes with a unit. Raises :class:`ModelLoadError` naming the bad entry."""
    if max_memory is None:
        return None
    if not isinstance(max_memory, dict) or not max_memory:
        raise ModelLoadError(f"max_memory must be a non-empty dict such as {{'cpu': '2GiB', 0: '20GiB'}}, "
                             f"got {max_memory!r}")
    out = {}
    for key, value in max_memory.items():
        device = _device_key(key)
        if device in out:
            raise ModelLoadError(f"max_memory: device {device!r} is given twice")
        out[device] = _size(device, value)
    return out


def parse_max_memory(text: str) -> dict:
    """The CLI form ``cpu=2GiB,0=20GiB`` as a checked ``max_memory`` dict
    ({'cpu': '2GiB', 0: '20GiB'})."""
    if not isinstance(text, str) or not text.strip():
        raise ModelLoadError("--max-memory needs DEVICE=SIZE pairs, e.g. cpu=2GiB,0=20GiB")
    pairs = {}
    for item in text.split(","):
        device, sep, size = item.partition("=")
        if not sep or not device.strip() or not size.strip():
            raise ModelLoadError(f"--max-memory: {item.strip()!r} is not DEVICE=SIZE (e.g. cpu=2GiB,0=20GiB)")
        key = _device_key(device)
        if key in pairs:
            raise ModelLoadError(f"--max-memory: device {key!r} is given twice")
        pairs[key] = size.strip()
    return check_max_memory(pairs)


def offload_kwargs(device_map=None, max_memory=None, offload_folder=None) -> dict:
    """The ``from_pretrained`` keyword arguments for placement: ``device_map`` (``"auto"``
    when only ``max_memory`` or ``offload_folder`` is given), the checked ``max_memory``,
    and ``offload_folder`` as an absolute path, created if missing (it must be a writable
    directory: weights that fit nowhere else are written there)."""
    kwargs = {}
    memory = check_max_memory(max_memory)
    if offload_folder is not None:
        if not isinstance(offload_folder, (str, os.PathLike)) or not os.fspath(offload_folder):
            raise ModelLoadError(f"offload_folder must be a directory path, got {offload_folder!r}")
        folder = os.path.abspath(os.fspath(offload_folder))
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise ModelLoadError(f"offload_folder {folder!r} exists and is not a directory")
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as err:
            raise ModelLoadError(f"offload_folder {folder!r} cannot be created: {err.strerror or err}") from err
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ModelLoadError(f"offload_folder {folder!r} is not writable")
        kwargs["offload_folder"] = folder
    if memory is not None:
        kwargs["max_memory"] = memory
    if device_map is not None:
        kwargs["device_map"] = device_map
    elif kwargs:
        kwargs["device_map"] = "auto"  # the only map that reads max_memory and offloads
    return kwargs
