"""``lmdeploy-ascend``: an AMCT record written the way lmdeploy's Ascend backend reads it.

lmdeploy's PyTorch engine on Ascend (``lmdeploy/pytorch/backends/dlinfer/ascend``,
``AscendKVQuantMeta.set_value``; the record is named by ``ASCEND_QUANT_RECORD_FILE``,
with ``quant_policy=8``) does not parse the record: it runs one regular expression over
the whole text that pairs a ``scale:`` number made only of digits, dots and minus signs
with the ``offset:`` integer right after it, and then requires the number of pairs to be
the number of decoder layers (one pair used for both K and V) or twice it (pair 2i is
layer i's key, 2i+1 its value). Hence, in what is written here:

* one ``scale`` and one ``offset`` per entry (per-tensor): a per-channel entry lists many
  scales before its offsets, and the regex would pair its last scale with its first
  offset, silently. Per-channel records are refused.
* floats in fixed-point notation: protobuf (and AMCT) print small floats as ``4e-05``,
  which the regex cannot read, so that entry drops out and the pair count breaks.
* entries ordered layer by layer, key then value, for layers 0..n-1 with none missing
  (the regex ignores keys; order and count are all it has).
* offsets in dlinfer's convention, i.e. negated: dlinfer's Ascend ``fill_kv_cache``
  (``dlinfer/vendor/ascend/torch_npu_ops.py``) quantizes ``round(x / s - o)`` and the
  attention dequantizes ``(q + o) * s`` (``antiquant_offset``), where AMCT and amct_hf
  quantize ``round(x / s) + o`` and dequantize ``(q - o) * s``. Written unchanged, every
  non-zero offset would be applied with the wrong sign.

Scales are the shortest fixed-point digits that round-trip each float32. The file keeps
the record's syntax, but its offsets are dlinfer's: read by an AMCT tool it would give
the negated offsets (zero offsets, the symmetric case, are the same in both).

Served correctly only where dlinfer passes the factors to its attention: dlinfer up to
v0.2.4 (from v0.2.5 the paged attention no longer passes ``kv_scales`` / ``kv_zeros`` to
the kernel, so an INT8 cache is read without dequantization), lmdeploy in eager mode
(the record is read only when graph mode is off) and ``ASCEND_QUANT_RECORD_FILE`` an
absolute path (docs/serving.md).
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import ExportError
from ..fileio import check_output_path, write_text_atomic
from ..naming import layer_index, layer_kind
from ..record.files import load_kv_factors

__all__ = ["format_fixed_point", "format_lmdeploy_record", "export_lmdeploy_ascend", "check_layer_count",
           "dlinfer_offset"]



def format_fixed_point(x: float) -> str:
    """Shortest fixed-point digits that read back as the same float32 (never ``4e-05``)."""
    return np.format_float_positional(np.float32(x), unique=True, trim="0")


def dlinfer_offset(amct_offset: int) -> int:
    """The offset dlinfer needs for an AMCT offset: ``round(x/s) + o == round(x/s - (-o))``
    for an integer ``o``, and ``(q - o) * s == (q + (-o)) * s``."""
    return -int(amct_offset)


def _ordered_layers(factors: dict, where: str) -> list[tuple[str, str]]:
    by_layer: dict[int, dict[str, str]] = {}
    for name in factors:
        kind = layer_kind(name)
        idx = layer_index(name)
        if kind is None or idx is None:
            raise ExportError(f"{where}: layer {name!r} is not a '...layers.<i>...' key or value "
                              f"entry; lmdeploy pairs entries with layers by position only")
        slot = by_layer.setdefault(idx, {})
        if kind in slot:
            raise ExportError(f"{where}: layer {idx} has two {kind} entries "
                              f"({slot[kind]!r}, {name!r})")
        slot[kind] = name
    out = []
    for i in range(len(by_layer)):
        if i not in by_layer:
            raise ExportError(f"{where}: decoder layer {i} has no entries (layers "
                              f"{sorted(by_layer)[:3]}...); lmdeploy needs every layer 0..n-1")
        slot = by_layer[i]
        for kind in ("key", "value"):
            if kind not in slot:
                raise ExportError(f"{where}: decoder layer {i} has no {kind} entry")
        out.append((slot["key"], slot["value"]))
    return out


def format_lmdeploy_record(factors: dict, where: str = "record") -> str:
    """The record text for lmdeploy's Ascend backend (see the module doc)."""
    for name, (scales, _) in factors.items():
        if len(scales) != 1:
            raise ExportError(
                f"{where}: layer {name!r} is per-channel ({len(scales)} scales); lmdeploy's Ascend "
                f"backend reads one scale/offset pair per entry and would misread it silently: "
                f"recalibrate per-tensor (--granularity per_tensor)")
    lines = []
    for k_name, v_name in _ordered_layers(factors, where):
        for name in (k_name, v_name):
            (scale,), (offset,) = factors[name]
            lines += ["record {", f'  key: "{name}"', "  kv_cache_value {",
                      f"    scale: {format_fixed_point(scale)}", f"    offset: {dlinfer_offset(offset)}",
                      "  }", "}"]
    return "\n".join(lines) + "\n"


def export_lmdeploy_ascend(record_file: str | os.PathLike, out_path: str | os.PathLike,
                           num_layers: int | None = None) -> str:
    """Write ``out_path`` for ``ASCEND_QUANT_RECORD_FILE``; returns the text written.
    Refuses per-channel records (the reason is in the message), records lacking a
    layer's key or value, and, given the model's ``num_layers``, a record of another
    layer count, before touching ``out_path``."""
    record_file, out_path = os.fspath(record_file), os.fspath(out_path)
    factors, where = load_kv_factors(record_file)
    check_layer_count(factors, num_layers, where)
    check_output_path(record_file, out_path)
    text = format_lmdeploy_record(factors, where=where)

    write_text_atomic(out_path, text)
    return text


def check_layer_count(factors: dict, num_layers: int | None, where: str) -> None:
    """Refuse a record whose decoder layers are not the model's ``num_layers``: lmdeploy
    counts the pairs only, so a record of 15 layers of a 30-layer model (30 pairs) would
    be read as one shared K/V pair per layer, silently. None: not checked."""
    if num_layers is None:
        return
    layers = {layer_index(name) for name in factors}
    if len(layers) != num_layers:
        raise ExportError(f"{where} holds {len(layers)} decoder layer(s), but the model has "
                          f"{num_layers}; lmdeploy pairs entries with layers by count only and would "
                          f"misread it: calibrate every layer of this model")
