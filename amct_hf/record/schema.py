"""The AMCT record's schema and how factors are printed into it.

The schema is built at import time from ``descriptor_pb2`` into a private descriptor
pool, so there is no protoc step and no clash with an installed AMCT that registers the
same ``AMCTPytorchProto`` names in the default pool. New entries are printed exactly as
``text_format`` (and so AMCT) prints them.
"""
from __future__ import annotations

import math
import operator
import re
import struct
from collections.abc import Mapping, Sequence

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

from ..errors import RecordFileError

__all__ = ["Factors", "KVRecord", "ScaleOffsetRecord", "fill_kv", "format_record", "kv_text", "parse_text",
           "print_text", "to_float32", "validate_factors"]

Factors = Mapping[str, "tuple[Sequence[float], Sequence[int]]"]

# --------------------------------------------------------------------------- schema
_F = descriptor_pb2.FieldDescriptorProto
_OPT, _REP = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED
_SCHEMA = {  # message -> [(field, number, label, type, type_name or None, default)]
    "ScaleOffsetRecord": [
        ("record", 1, _REP, _F.TYPE_MESSAGE, "MapFiledEntry", None),
        ("prune_record", 2, _REP, _F.TYPE_MESSAGE, "PruneRecord", None),
    ],
    "MapFiledEntry": [
        ("key", 1, _OPT, _F.TYPE_STRING, None, None),
        ("value", 2, _OPT, _F.TYPE_MESSAGE, "SingleLayerRecord", None),
        ("kv_cache_value", 3, _OPT, _F.TYPE_MESSAGE, "SingleLayerKVCacheRecord", None),
    ],
    "SingleLayerKVCacheRecord": [
        ("scale", 1, _REP, _F.TYPE_FLOAT, None, None),
        ("offset", 2, _REP, _F.TYPE_INT32, None, None),
    ],
    "SingleLayerRecord": [
        ("scale_d", 1, _OPT, _F.TYPE_FLOAT, None, None),
        ("offset_d", 2, _OPT, _F.TYPE_INT32, None, None),
        ("scale_w", 3, _REP, _F.TYPE_FLOAT, None, None),
        ("offset_w", 4, _REP, _F.TYPE_INT32, None, None),
        ("shift_bit", 5, _REP, _F.TYPE_UINT32, None, None),
        ("tensor_balance_factor", 6, _REP, _F.TYPE_FLOAT, None, None),
        # Defaults as in AMCT's scale_offset_record_pytorch.proto.
        ("skip_fusion", 9, _OPT, _F.TYPE_BOOL, None, "true"),
        ("dst_type", 10, _OPT, _F.TYPE_STRING, None, "INT8"),
        ("act_type", 11, _OPT, _F.TYPE_STRING, None, "INT8"),
        ("wts_type", 12, _OPT, _F.TYPE_STRING, None, "INT8"),
        ("fakequant_precision_mode", 13, _OPT, _F.TYPE_STRING, None, None),
        ("scale_h", 21, _OPT, _F.TYPE_FLOAT, None, None),
        ("offset_h", 22, _OPT, _F.TYPE_INT32, None, None),
        ("scale_r", 23, _REP, _F.TYPE_FLOAT, None, None),
        ("offset_r", 24, _REP, _F.TYPE_INT32, None, None),
    ],
    # Body deliberately undeclared: its content is kept verbatim (see module doc).
    "PruneRecord": [],
}
_PACKAGE = "AMCTPytorchProto"


def _build_schema():
    fdp = descriptor_pb2.FileDescriptorProto(
        name="amct_hf/scale_offset_record.proto", package=_PACKAGE, syntax="proto2")
    for msg_name, fields in _SCHEMA.items():
        msg = fdp.message_type.add(name=msg_name)
        for name, number, label, ftype, type_name, default in fields:
            f = msg.field.add(name=name, number=number, label=label, type=ftype)
            if type_name:
                f.type_name = f".{_PACKAGE}.{type_name}"
            if default is not None:
                f.default_value = default
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    get_class = getattr(message_factory, "GetMessageClass", None)
    if get_class is None:  # protobuf < 4.22
        get_class = message_factory.MessageFactory(pool).GetPrototype
    return tuple(get_class(pool.FindMessageTypeByName(f"{_PACKAGE}.{n}"))
                 for n in ("ScaleOffsetRecord", "SingleLayerKVCacheRecord"))


ScaleOffsetRecord, KVRecord = _build_schema()


def print_text(msg, **kw) -> str:
    return text_format.MessageToString(msg, as_utf8=True, **kw)


def parse_text(text: str, where: str):
    rec = ScaleOffsetRecord()
    try:
        text_format.Parse(text, rec, allow_unknown_field=True)
    except text_format.ParseError as e:
        raise RecordFileError(f"record {where} does not parse: {e}") from e
    return rec


# --------------------------------------------------------------------------- validation
_I32 = (-(2 ** 31), 2 ** 31 - 1)


def to_float32(x: float) -> float:
    """``x`` rounded to the nearest float32 (as a Python float)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def validate_factors(factors: Factors) -> dict[str, tuple[list[float], list[int]]]:
    out = {}
    for name, value in factors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"record layer name must be a non-empty str, got {name!r}")
        try:
            name.encode("utf-8")
            scales, offsets = value
            if isinstance(scales, (str, bytes)) or isinstance(offsets, (str, bytes)):
                raise TypeError("scales/offsets must be sequences of numbers")
            scales, offsets = list(scales), list(offsets)
        except (TypeError, ValueError) as e:
            raise ValueError(f"layer {name!r}: expected (scales, offsets): {e}") from None
        if not scales or len(scales) != len(offsets):
            raise ValueError(f"layer {name!r}: scales and offsets must have the same non-zero "
                             f"length, got {len(scales)} and {len(offsets)}")
        f32 = []
        for s in scales:
            try:
                # Checked after float32 rounding: 1e39 or 1e-50 would be stored as inf / 0.
                v = to_float32(float(s))
            except (TypeError, ValueError, OverflowError):
                v = math.nan
            if isinstance(s, bool) or not (math.isfinite(v) and v > 0):
                raise ValueError(f"layer {name!r}: scale {s!r} is not a finite positive float32")
            f32.append(v)
        ints = []
        for o in offsets:
            try:
                if isinstance(o, bool):
                    raise TypeError
                i = operator.index(o)
            except TypeError:
                raise ValueError(f"layer {name!r}: offset {o!r} is not an int") from None
            if not _I32[0] <= i <= _I32[1]:
                raise ValueError(f"layer {name!r}: offset {i} is outside the int32 range")
            ints.append(i)
        out[name] = (f32, ints)
    return out


def fill_kv(kv, scales, offsets):
    kv.Clear()
    kv.scale.extend(scales)
    kv.offset.extend(offsets)


# record keys printed as they are: protobuf's string escaping changes none of these characters
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.:/\-]+")


def _shortest_float(v: float) -> str:
    """protobuf's text form of the float32 ``v`` (text_format's ToShortestFloat, then str):
    the fewest significant digits, from 6 up, that read back as the same float32."""
    for digits in (6, 7, 8, 9):
        rounded = float(f"{v:.{digits}g}")
        if to_float32(rounded) == v:
            return str(rounded)
    return str(float(f"{v:.9g}"))  # unreachable: 9 digits always round-trip a float32


def kv_text(scales: Sequence[float], offsets: Sequence[int], indent: str = "") -> str:
    """``kv_cache_value``'s fields exactly as protobuf prints them (one per line), without
    its pure-Python printer: printing 1024 floats through it costs ~20 ms per write."""
    lines = [f"{indent}scale: {_shortest_float(v)}\n" for v in scales]
    lines += [f"{indent}offset: {o}\n" for o in offsets]
    return "".join(lines)


def format_record(factors: Factors) -> str:
    """Text of a fresh record holding only these layers, exactly as AMCT prints it."""
    valid = validate_factors(factors)
    if not all(_PLAIN_KEY.fullmatch(name) for name in valid):
        rec = ScaleOffsetRecord()
        for name, (scales, offsets) in valid.items():
            entry = rec.record.add(key=name)
            fill_kv(entry.kv_cache_value, scales, offsets)
        return print_text(rec)
    return "".join(f'record {{\n  key: "{name}"\n  kv_cache_value {{\n{kv_text(scales, offsets, "    ")}'
                   f"  }}\n}}\n" for name, (scales, offsets) in valid.items())

