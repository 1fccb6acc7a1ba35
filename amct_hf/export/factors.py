"""Export KV-cache factors from an AMCT record to JSON or safetensors, and read them back.

The record (SPEC §4) is what AMCT tools consume; inference engines want the factors
as plain arrays. Both exports hold exactly the record's float32 scales and int32
offsets, so ``load_export(out) == read_kv_factors(record)``:

* JSON: each float32 scale is written as the Python float of that same value; the
  JSON repr of a float round-trips exactly, and reading back gives the same float32.
* safetensors: ``<layer>.kv_cache_scale`` (float32, [C]) and ``<layer>.kv_cache_offset``
  (int32, [C]) per record layer (C = 1 for per-tensor factors): amct_hf's own layout, not
  one an engine loads. The names are those Ascend engines use, but their layout differs:
  MindIE reads ``kv_cache_offset`` as float32 and bit-casts it to int32, so a non-zero
  int32 offset here would be misread, and vllm-ascend wants the model's dtype and the
  record layer named ``<attn>.k_proj`` / ``v_proj``. For an engine use ``--format
  ascend-c8`` (float offsets, zeros).

safetensors is imported only when a safetensors file is written or read.
"""
from __future__ import annotations

import json
import os

from ..algorithms.convention import factor_problem
from ..errors import ExportError, MissingFileError
from ..fileio import atomic_replace, check_output_path, write_text_atomic
from ..naming import layer_kind
from ..record.files import load_kv_factors
from ..record.schema import to_float32

__all__ = ["EXPORT_FORMAT", "EXPORT_VERSION", "SCALE_SUFFIX", "OFFSET_SUFFIX", "export_json",
           "export_safetensors", "load_export"]

EXPORT_FORMAT = "amct_hf.kv_cache_factors"
EXPORT_VERSION = 1
SCALE_SUFFIX = ".kv_cache_scale"
OFFSET_SUFFIX = ".kv_cache_offset"

Factors = "dict[str, tuple[list[float], list[int]]]"


# --------------------------------------------------------------------------- JSON
def export_json(record_file: str | os.PathLike, out_path: str | os.PathLike) -> dict:
    """Write the record's KV factors as JSON; returns the document written."""
    record_file, out_path = os.fspath(record_file), os.fspath(out_path)
    factors, _ = load_kv_factors(record_file)
    check_output_path(record_file, out_path)
    doc = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "layers": {
            name: {
                "scale": [float(s) for s in scales],
                "offset": [int(o) for o in offsets],
                "granularity": "per_tensor" if len(scales) == 1 else "per_channel",
                "kind": layer_kind(name) or "unknown",
            }
            for name, (scales, offsets) in factors.items()
        },
    }

    write_text_atomic(out_path, json.dumps(doc, indent=1, allow_nan=False) + "\n")
    return doc


def _load_json(path: str) -> Factors:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{path} is not an {EXPORT_FORMAT} export (missing or wrong 'format')")
    if doc.get("version") != EXPORT_VERSION:
        raise ExportError(f"{path}: unsupported export version {doc.get('version')!r}, "
                         f"expected {EXPORT_VERSION}")
    layers = doc.get("layers")
    if not isinstance(layers, dict):
        raise ExportError(f"{path}: 'layers' must be an object of layer name -> factors")
    out = {}
    for name, entry in layers.items():
        try:
            scales, offsets = entry["scale"], entry["offset"]
            if not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scales):
                raise TypeError("scale must be a list of numbers")
            if not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets):
                raise TypeError("offset must be a list of integers")
        except (KeyError, TypeError) as e:
            raise ExportError(f"{path}: layer {name!r}: bad entry ({e})") from None
        if not scales or len(scales) != len(offsets):
            raise ExportError(f"{path}: layer {name!r} has {len(scales)} scales "
                             f"and {len(offsets)} offsets")
        # Rounding to float32 matches what a record would hold for a hand-written 0.1.
        out[name] = ([to_float32(float(s)) for s in scales], [int(o) for o in offsets])
    return out


# --------------------------------------------------------------------------- safetensors
def _require_safetensors():
    try:
        import safetensors.torch  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        raise ExportError(f"the safetensors format needs the 'safetensors' package ({e}); "
                           f"pip install safetensors") from None


def export_safetensors(record_file: str | os.PathLike, out_path: str | os.PathLike) -> dict:
    """Write ``<layer>.kv_cache_scale`` / ``<layer>.kv_cache_offset`` tensors; returns them."""
    record_file, out_path = os.fspath(record_file), os.fspath(out_path)
    factors, _ = load_kv_factors(record_file)
    check_output_path(record_file, out_path)
    _require_safetensors()
    import torch

    tensors = {}
    for name, (scales, offsets) in factors.items():
        for key in (name + SCALE_SUFFIX, name + OFFSET_SUFFIX):
            if key in tensors:  # e.g. layers "x" and "x.kv_cache_scale" in one record
                raise ExportError(f"record {record_file}: tensor name {key!r} would be used twice")
        tensors[name + SCALE_SUFFIX] = torch.tensor(scales, dtype=torch.float32)
        tensors[name + OFFSET_SUFFIX] = torch.tensor(offsets, dtype=torch.int32)
    metadata = {"format": EXPORT_FORMAT, "source_record": os.path.basename(record_file)}
    blob = _safetensors_bytes(tensors, metadata)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(blob)
    atomic_replace(out_path, write)
    return tensors


def _safetensors_bytes(tensors: dict, metadata: dict) -> bytes:
    """The safetensors file with its JSON header in sorted key order: the library writes
    metadata in a per-process hash order, so the same record would give other bytes on
    every run."""
    from safetensors.torch import save

    blob = save(tensors, metadata=metadata)
    n = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data keeps the 8-byte alignment the format expects
    return len(header).to_bytes(8, "little") + header + blob[8 + n:]


def _load_safetensors(path: str) -> Factors:
    _require_safetensors()
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            # Other tools' files (e.g. model weights with these tensors merged in) carry
            # no or other metadata; only a different *claimed* format is an error.
            if "format" in meta and meta["format"] != EXPORT_FORMAT:
                raise ExportError(f"{path}: metadata format {meta['format']!r}, "
                                 f"expected {EXPORT_FORMAT!r}")
            names = list(f.keys())
            layers = [n[: -len(SCALE_SUFFIX)] for n in names if n.endswith(SCALE_SUFFIX)]
            if not layers:
                raise ExportError(f"{path} has no '*{SCALE_SUFFIX}' tensors")
            out = {}
            for layer in layers:
                if layer + OFFSET_SUFFIX not in names:
                    raise ExportError(f"{path}: {layer + SCALE_SUFFIX!r} has no matching "
                                     f"{layer + OFFSET_SUFFIX!r} tensor")
                s = f.get_tensor(layer + SCALE_SUFFIX)
                o = f.get_tensor(layer + OFFSET_SUFFIX)
                if s.ndim != 1 or o.ndim != 1 or s.numel() != o.numel() or s.numel() == 0:
                    raise ExportError(f"{path}: layer {layer!r}: scale {list(s.shape)} and "
                                     f"offset {list(o.shape)} must be 1-D of the same length")
                if not s.is_floating_point() or o.is_floating_point() or o.dtype.is_complex:
                    raise ExportError(f"{path}: layer {layer!r}: expected float scale and "
                                     f"integer offset, got {s.dtype} and {o.dtype}")
                out[layer] = (s.float().tolist(), [int(v) for v in o.tolist()])
    except SafetensorError as e:
        raise ExportError(f"{path} is not a readable safetensors file: {e}") from None
    return out


# --------------------------------------------------------------------------- read back
def load_export(path: str | os.PathLike) -> Factors:
    """Layer -> (scales, offsets) from a ``.json`` or ``.safetensors`` export.

    Same shape and values as ``read_kv_factors`` of the record it came from.
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".json", ".safetensors"):
        raise ExportError(f"cannot tell the export format of {path}: expected a .json or "
                         f".safetensors file")
    if not os.path.isfile(path):
        raise MissingFileError(f"export file not found: {path}")
    factors = _load_json(path) if ext == ".json" else _load_safetensors(path)
    for name, (scales, offsets) in factors.items():
        problem = factor_problem(scales, offsets)
        if problem:
            raise ExportError(f"{path}: layer {name!r} has unusable factors: {problem}")
    return factors
