"""The AMCT record file (SPEC §4): protobuf text format, incremental and safe.

The schema is built at import time from ``descriptor_pb2`` into a private
descriptor pool, so there is no protoc step and no clash with an installed
AMCT that registers the same ``AMCTPytorchProto`` names in the default pool.

How foreign content survives a merge
------------------------------------
A file may hold entries this module does not understand: other tools'
``value {}`` records, ``prune_record`` bodies (AMCT's ``PruneNode``/``AttrProto``
types are not part of the spec, so ``PruneRecord`` is declared empty), or
fields from a newer AMCT schema. Re-printing a parsed message would silently
drop whatever the schema lacks, so a merge never re-prints existing content:

* :mod:`record_scan` splits the text into top-level fields: the entries we and AMCT
  print are matched by one exact pattern (no protobuf parse: a parse costs ~1.6 s per
  MB, which made layer-by-layer writes quadratic), every other field is parsed alone
  by protobuf with ``allow_unknown_field=True`` -- this validates syntax and type of
  every *known* field (``scale: oops`` is an error, reported with the whole-file
  parser's line:column) while tolerating fields we do not know;
* fields we do not modify are copied byte for byte, comments and layout included;
* in an entry whose ``kv_cache_value`` is replaced, only that sub-block is cut
  out and a freshly printed one inserted, so its ``key``/``value {}``/unknown
  fields stay as they were;
* new layers are appended, printed by ``text_format`` exactly as AMCT prints.

The edited entries and the appended text are scanned again and must read back the
values written before the merged text replaces the file. An entry we do not write is
never judged by its values: one holding ``scale: nan`` is kept as it is (reading it
fails, naming the layer).
"""
from __future__ import annotations

import math
import operator
import os
import re
import stat
import struct
import warnings
from array import array
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

from ..errors import OutputPathError, RecordFileError, RecordOverwriteWarning
from ..fileio import exclusive_lock, file_kind, replace_refusal, write_text_atomic
from ..settings.validate import lock_timeout_seconds
from . import scanner as record_scan
from .scanner import Tokens

__all__ = [
    "load_kv_factors",
    "to_float32",
    "RecordFileError",
    "RecordOverwriteWarning",
    "ScaleOffsetRecord",
    "check_record_file",
    "uneditable_keys",
    "format_record",
    "parse_record_text",
    "read_kv_factors",
    "write_kv_factors",
]


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


ScaleOffsetRecord, _KVRecord = _build_schema()


def _print(msg, **kw) -> str:
    return text_format.MessageToString(msg, as_utf8=True, **kw)


def _parse(text: str, where: str):
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


def _validate(factors: Factors) -> dict[str, tuple[list[float], list[int]]]:
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


def _fill_kv(kv, scales, offsets):
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


def _kv_text(scales: Sequence[float], offsets: Sequence[int], indent: str = "") -> str:
    """``kv_cache_value``'s fields exactly as protobuf prints them (one per line), without
    its pure-Python printer: printing 1024 floats through it costs ~20 ms per write."""
    lines = [f"{indent}scale: {_shortest_float(v)}\n" for v in scales]
    lines += [f"{indent}offset: {o}\n" for o in offsets]
    return "".join(lines)


def format_record(factors: Factors) -> str:
    """Text of a fresh record holding only these layers, exactly as AMCT prints it."""
    valid = _validate(factors)
    if not all(_PLAIN_KEY.fullmatch(name) for name in valid):
        rec = ScaleOffsetRecord()
        for name, (scales, offsets) in valid.items():
            entry = rec.record.add(key=name)
            _fill_kv(entry.kv_cache_value, scales, offsets)
        return _print(rec)
    return "".join(f'record {{\n  key: "{name}"\n  kv_cache_value {{\n{_kv_text(scales, offsets, "    ")}'
                   f"  }}\n}}\n" for name, (scales, offsets) in valid.items())


# --------------------------------------------------------------------------- index
_Values = "tuple[list[float], list[int]]"


class _Entry(NamedTuple):
    """One ``record`` entry: its key, the top-level field holding it, and its
    ``kv_cache_value`` (a canonical match, values parsed by protobuf, or None)."""
    key: str
    field: int
    kv: object


class _Index(NamedTuple):
    fields: list
    entries: list
    subs: dict  # field number -> parsed message, for the foreign fields


def _values(kv, text: str) -> tuple[list[float], list[int]]:
    """Values of an entry's kv: parsed already, or read from a canonical entry's lines."""
    if not isinstance(kv, record_scan.Canonical):
        return kv
    # array("f") rounds to the nearest float32 (overflow: inf) as protobuf's C cast does
    scales = array("f", map(float, text[kv.s[0]:kv.s[1]].split()[1::2])).tolist()
    return scales, list(map(int, text[kv.o[0]:kv.o[1]].split()[1::2]))


def _refuse(text: str, where: str, start: int, end: int, reason: str):
    """Raise the RecordFileError a whole-file parse gives, for a field that failed here.

    The failing part is parsed from the start of its line (whatever precedes it on that
    line is complete fields) to the end of the line where it ends, and protobuf's line
    number is shifted, so the message is the whole-file parser's."""
    a = text.rfind("\n", 0, start) + 1
    b = text.find("\n", end)
    b = len(text) if b < 0 else b
    try:
        text_format.Parse(text[a:b], ScaleOffsetRecord(), allow_unknown_field=True)
    except text_format.ParseError as e:
        line = e.GetLine()
        msg = str(e)
        if line is not None:
            msg = re.sub(r"^\d+", str(line + text.count("\n", 0, a)), msg, count=1)
        raise RecordFileError(f"record {where} does not parse: {msg}") from e
    _parse(text, where)  # the part parses alone: ask the whole file
    raise RecordFileError(f"record {where}: cannot split into entries ({reason})")


def _index(text: str, where: str, start: int = 0) -> _Index:
    """Entries of ``text`` (from ``start``), validated; see record_scan for the fast path."""
    try:
        return _index_fields(text, where, start)
    except RecursionError:
        raise _too_deep(where) from None


def _too_deep(where: str) -> RecordFileError:
    # protobuf's text parser recurses once per level of nested (unknown) fields
    return RecordFileError(f"record {where} does not parse: fields are nested more deeply than "
                           f"the protobuf text parser can follow; left untouched")


def _index_fields(text: str, where: str, start: int = 0) -> _Index:
    try:
        fields = record_scan.scan(text, start)
    except ValueError as e:
        _refuse(text, where, start, len(text), str(e))
    subs = {}
    for i, f in enumerate(fields):
        if f.entry is None:
            sub = ScaleOffsetRecord()
            try:
                text_format.Parse(text[f.start:f.end], sub, allow_unknown_field=True)
            except text_format.ParseError:
                _refuse(text, where, f.start, f.end, "field does not parse alone")
            subs[i] = sub
    return _make_index(fields, subs)


def _make_index(fields: list, subs: dict) -> _Index:
    entries = []
    for i, f in enumerate(fields):
        if f.entry is not None:
            entries.append(_Entry(f.entry.key, i, f.entry))
            continue
        for e in subs[i].record:
            kv = None
            if e.HasField("kv_cache_value"):
                kv = (list(e.kv_cache_value.scale), list(e.kv_cache_value.offset))
            entries.append(_Entry(e.key, i, kv))
    return _Index(fields, entries, subs)


def _check_values(where: str, layer: str, scales: list[float], offsets: list[int]) -> None:
    if not scales or len(scales) != len(offsets):
        raise RecordFileError(
            f"record {where}: layer {layer!r} has an invalid kv_cache_value: {len(scales)} "
            f"scale(s) and {len(offsets)} offset(s), expected the same non-zero number")
    for c, s in enumerate(scales):
        if not (math.isfinite(s) and s > 0):
            raise RecordFileError(
                f"record {where}: layer {layer!r} has an invalid kv_cache_value: scale {s!r} "
                f"(channel {c}) is not a finite positive float32")


def _read_factors(text: str, where: str) -> dict[str, tuple[list[float], list[int]]]:
    # Duplicate keys: the last entry wins, as when AMCT builds its dict.
    last = {e.key: e.kv for e in _index(text, where).entries if e.kv is not None}
    out = {}
    for layer, kv in last.items():
        out[layer] = _values(kv, text)
        _check_values(where, layer, *out[layer])
    return out


def parse_record_text(text: str) -> dict[str, tuple[list[float], list[int]]]:
    """Layer -> (scales, offsets) of the entries with ``kv_cache_value`` in ``text``.

    Raises RecordFileError when the text does not parse or an entry holds a scale that
    is not finite and positive, or scales and offsets of different (or zero) lengths."""
    return _read_factors(text, "<text>")


# --------------------------------------------------------------------------- merge
def _line_span(text: str, s: int, e: int) -> tuple[int, int]:
    """Widen [s, e) to whole lines when nothing else shares them, so no blank lines remain."""
    ls = s
    while ls > 0 and text[ls - 1] in " \t":
        ls -= 1
    le = e
    while le < len(text) and text[le] in " \t\r":
        le += 1
    if (ls == 0 or text[ls - 1] == "\n") and (le == len(text) or text[le] == "\n"):
        return ls, min(le + 1, len(text))
    return s, e


def _kv_block(text: str, toks: Tokens, open_i: int, close_i: int, kv) -> tuple[int, str]:
    """Where and what to insert for a new kv_cache_value inside an entry's braces."""
    close_pos = toks.toks[close_i][2]
    line_start = text.rfind("\n", 0, close_pos) + 1
    if text[line_start:close_pos].strip():  # one-line entry: stay one line
        return close_pos, f"kv_cache_value {{ {_print(kv, as_one_line=True)} }} "
    indent = text[line_start:close_pos] + "  "
    if close_i > open_i + 1:  # follow the indentation of the entry's first field
        first = toks.toks[open_i + 1][2]
        fls = text.rfind("\n", 0, first) + 1
        if not text[fls:first].strip():
            indent = text[fls:first]
    return line_start, _indented_kv(indent, kv)


def _indented_kv(indent: str, kv) -> str:
    body = _kv_text(list(kv.scale), list(kv.offset), indent + "  ")
    return f"{indent}kv_cache_value {{\n{body}{indent}}}\n"


def _foreign_edits(text: str, where: str, layer: str, f, sub, kv) -> list[tuple[int, int, str]]:
    """Edits replacing the kv_cache_value of the foreign field ``f`` (one entry)."""
    toks = Tokens(text, f.start, f.end)
    top = list(toks.fields(0, len(toks.toks)))
    if len(top) != 1:
        raise RecordFileError(f"record {where}: cannot split into entries (layer {layer!r})")
    _, _, _, body = top[0]
    if body is None or len(sub.record) != 1:
        raise RecordFileError(
            f"record {where}: the entry for layer {layer!r} uses the list form "
            f"'record: [...]', which cannot be edited without loss")
    close = toks.match[body]
    edits = []
    for fname, f0, f1, _ in toks.fields(body + 1, close):
        if fname == "kv_cache_value":
            a, b = _line_span(text, toks.toks[f0][2], toks.toks[f1][3])
            edits.append((a, b, ""))
    pos, block = _kv_block(text, toks, body, close, kv)
    edits.append((pos, pos, block))
    return edits


def _merge(text: str, where: str, new: dict[str, tuple[list[float], list[int]]],
           idx: _Index | None = None):
    """The merged text and {layer: (old_scales, old_offsets)} of the layers
    overwritten. Only the fields holding a written layer are touched (and checked again
    afterwards); every other byte is copied, so the cost is one scan of the text, none
    when ``idx`` (the index of this very text) is given. Also returns the merged text's
    index, built from ``idx`` and the fields scanned again."""
    idx = idx or _index(text, where)
    old: dict[str, tuple[list[float], list[int]]] = {}
    holders: dict[str, list[_Entry]] = {}  # layer -> its entries (duplicate keys happen)
    for e in idx.entries:
        if e.key in new:
            holders.setdefault(e.key, []).append(e)
    edits: list[tuple[int, int, str]] = []
    touched: dict[int, str] = {}  # field number -> layer
    for layer, entries in holders.items():
        with_kv = [h for h in entries if h.kv is not None]
        if with_kv:
            old[layer] = _values(with_kv[-1].kv, text)  # the one a reader sees
        kv = _KVRecord()
        _fill_kv(kv, *new[layer])
        # Replace every copy so that readers agree whichever duplicate they take;
        # with none, the last entry of that key gains the block (next to its value {}).
        for h in (with_kv or entries[-1:]):
            f = idx.fields[h.field]
            touched[h.field] = layer
            if f.entry is not None:  # canonical: the block's lines are known exactly
                edits.append((*f.entry.kv, _indented_kv("  ", kv)))
            else:
                edits.extend(_foreign_edits(text, where, layer, f, idx.subs[h.field], kv))
    edits.sort(key=lambda x: (x[0], x[1]))
    pieces, pos = [], 0
    for a, b, repl in edits:
        pieces += [text[pos:a], repl]
        pos = b
    pieces.append(text[pos:])
    fresh = {k: v for k, v in new.items() if k not in holders}
    if fresh:
        if text and not text.endswith("\n"):
            pieces.append("\n")
        pieces.append(format_record(fresh))
    out = "".join(pieces)
    out_idx = _check_merge(out, where, new, idx, edits, touched, len(pieces[-1]) if fresh else 0)
    return out, old, out_idx


def _check_merge(out, where, new, idx, edits, touched, tail_len) -> _Index:
    """Scan the edited fields and the appended tail of the merged text again: each is still
    one field, holds the same keys and reads back exactly the values written. Every other
    byte is a copy of the text that was scanned and validated before."""

    def shifted(p):  # p is outside every edit
        return p + sum(len(r) - (b - a) for a, b, r in edits if b <= p)

    def fail(why):
        raise RecordFileError(f"record {where}: internal merge check failed ({why}); "
                              "file left untouched")

    checked = []
    fields, subs = [], {}
    for i, f in enumerate(idx.fields):
        a = shifted(f.start)
        if i not in touched:  # a byte-for-byte copy
            if i in idx.subs:
                subs[len(fields)] = idx.subs[i]
            fields.append(f.shifted(a - f.start))
            continue
        layer, b = touched[i], shifted(f.end)
        got = _index(out[:b], f"{where} (merged)", a)
        if len(got.fields) != 1 or got.fields[0].end != b:
            fail(f"layer {layer!r} no longer one entry")
        keys = [e.key for e in idx.entries if e.field == i]
        if [e.key for e in got.entries] != keys:
            fail(f"keys of the entry of {layer!r} changed")
        checked += [e for e in got.entries if e.key in new]
        if 0 in got.subs:
            subs[len(fields)] = got.subs[0]
        fields.append(got.fields[0])
    got = _index(out, f"{where} (merged)", len(out) - tail_len)
    if len(got.entries) != len(new) - len({e.key for e in idx.entries if e.key in new}):
        fail("appended entries")
    for e in checked + got.entries:
        if e.kv is None or _values(e.kv, out) != new[e.key]:
            fail(f"layer {e.key!r} does not read back")
    for i, f in enumerate(got.fields):
        if i in got.subs:
            subs[len(fields)] = got.subs[i]
        fields.append(f)
    return _make_index(fields, subs)


# --------------------------------------------------------------------------- file I/O
def _read_text(path: str, where: str) -> str:
    try:  # a socket cannot even be opened: say what it is
        mode = os.stat(path).st_mode
    except OSError:
        mode = stat.S_IFREG  # missing or unreadable: open() below says which
    if not stat.S_ISREG(mode):
        raise RecordFileError(f"record {where}: cannot read: is {file_kind(mode)}, "
                              "not a regular file")
    try:
        # O_NONBLOCK: a FIFO must not block us; it is refused below
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return ""
    except OSError as e:  # PermissionError, a socket (ENXIO), ...
        raise RecordFileError(f"record {where}: cannot read: {e}") from e
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise RecordFileError(f"record {where}: cannot read: is {file_kind(mode)}, "
                              "not a regular file")
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read()
        except OSError as e:
            raise RecordFileError(f"record {where}: cannot read: {e}") from e
    _refuse_bom(data, where)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordFileError(f"record {where} does not parse: not UTF-8 text ({e})") from e


def _refuse_bom(data: bytes, where: str) -> None:
    # protobuf's text format has no byte-order mark; its own message would point at an
    # invisible character, so name it (the file is left as it is: editors add it silently)
    if data.startswith(b"\xef\xbb\xbf"):
        raise RecordFileError(f"record {where} starts with a UTF-8 byte-order mark (bytes EF BB BF), "
                              f"which the protobuf text format does not allow; save it as UTF-8 "
                              f"without BOM; left untouched")


def read_kv_factors(path: str | os.PathLike) -> dict[str, tuple[list[float], list[int]]]:
    """Layer name -> (scales, offsets) of every entry with ``kv_cache_value``.

    A missing or empty file gives ``{}``. No lock is taken: writers replace the
    file atomically, so a reader always sees a complete file. Raises RecordFileError
    when the file is not a regular file, does not parse, or an entry is invalid
    (a scale that is not finite and positive, scales and offsets of different lengths);
    the message names the layer and the value.
    """
    path = os.fspath(path)
    return _read_factors(_read_text(path, path), path)


def check_record_file(path: str | os.PathLike) -> None:
    """Refuse, before any calibration work, a record that ``write_kv_factors`` would refuse:
    not a regular file, read-only, in a directory that takes no new file, unreadable or
    unparsable. Entries with invalid values
    are not checked: a write keeps them untouched (only reading them fails)."""
    where = os.fspath(path)
    target = os.path.realpath(where)
    _refuse_target(target, where)
    _refuse_unwritable_dir(target, where)
    _index(_read_text(target, where), where)


def _refuse_unwritable_dir(target: str, where: str) -> None:
    # the write puts a temp file beside the record and renames it: its directory must
    # take new files, which is only known for sure by trying
    from ..fileio import writable_dir_problem

    problem = writable_dir_problem(target)
    if problem:
        raise RecordFileError(f"record {where}: {problem}; the record could not be written")


# target -> (text, index) of this process's last write: the operator writes one layer at a
# time, and rescanning a record it wrote itself would make its writes quadratic again.
# Keyed by content, so it cannot go stale; one entry, so it holds one record's text.
_last_write: dict[str, tuple[str, _Index]] = {}


def _refuse_target(target: str, where: str) -> None:
    problem = replace_refusal(target)
    if problem:
        raise RecordFileError(f"record {where}: {problem}; left untouched")


def _changed(old: tuple[list[float], list[int]], new: tuple[list[float], list[int]]) -> str:
    """The fields that differ (``"scale"``, ``"offset"``, both), or "" when none does."""
    fields = [n for n, a, b in zip(("scale", "offset"), old, new) if list(a) != list(b)]
    return ", ".join(fields)


def write_kv_factors(path: str | os.PathLike, factors: Factors, *,
                     lock_timeout: float | None = None) -> list[str]:
    """Merge ``factors`` (layer -> (scales, offsets)) into the record file at ``path``.

    Each layer's ``kv_cache_value`` is replaced or inserted; everything else in
    the file is kept as it was, new layers are appended. The read-modify-write
    runs under a lock on ``<path>.lock`` (removed afterwards) and the file is replaced
    atomically; a symlink is written through. Returns the layers whose existing
    ``kv_cache_value`` was overwritten. Entries rewritten with different values are
    reported by one ``RecordOverwriteWarning`` (the layer and the changed fields; for
    several, a count and the first names); rewriting the same values says nothing.

    Raises ``ValueError`` for invalid factors and ``RecordFileError`` when the
    existing file cannot be read, parsed or replaced (also: not a regular file,
    read-only); in all cases the file is untouched. ``lock_timeout`` (seconds; None or
    negative: wait forever) bounds the wait for another writer's lock; past it a
    RecordFileError names the lock file and the pid holding it.
    An empty ``factors`` writes nothing and does not create the file.
    """
    new = _validate(factors)  # before any I/O: nothing is written if one entry is bad
    timeout = lock_timeout_seconds(lock_timeout)
    if not new:
        return []
    where = os.fspath(path)
    target = os.path.realpath(where)  # write through a symlink rather than replace it
    try:
        _refuse_target(target, where)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with exclusive_lock(target + ".lock", timeout):
            _refuse_target(target, where)  # again: it may have changed while we waited
            text = _read_text(target, where)
            known = _last_write.get(target)
            # reuse the index only for the very same text (equal strings: memcmp speed);
            # whatever another process did in between, a changed text is scanned afresh
            idx = known[1] if known is not None and known[0] == text else None
            _last_write.clear()
            text, old, out_idx = _merge(text, where, new, idx)

            write_text_atomic(target, text)
            _last_write[target] = (text, out_idx)
    except RecordFileError:
        raise
    except TimeoutError as e:
        raise RecordFileError(f"record {where}: {e}") from e
    except RecursionError:
        raise _too_deep(where) from None
    except (OSError, OutputPathError) as e:
        raise RecordFileError(f"record {where}: cannot write: {e}") from e
    # an entry rewritten with the same values (a rerun) is not news; changed ones are
    # summed up in one warning
    changed = [(layer, _changed(before, new[layer])) for layer, before in old.items()
               if _changed(before, new[layer])]
    if len(changed) == 1:
        layer, fields = changed[0]
        warnings.warn(f"record {where}: layer {layer!r} already had kv_cache_value; "
                      f"overwritten fields: {fields}", RecordOverwriteWarning, stacklevel=2)
    elif changed:
        shown = ", ".join(f"{layer!r} ({fields})" for layer, fields in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        warnings.warn(f"record {where}: {len(changed)} entries already had kv_cache_value and were "
                      f"overwritten with changed values: {shown}{more}", RecordOverwriteWarning,
                      stacklevel=2)
    return [layer for layer in new if layer in old]


def load_kv_factors(record) -> tuple[dict[str, tuple[list[float], list[int]]], str]:
    """The factors to *use* (INT8 cache, evaluation, exports, report) and a description of
    where they came from: a record file that must exist and hold ``kv_cache_value``
    entries, or a ``{record key: (scales, offsets)}`` mapping. Every entry is checked
    with the INT8 convention (:func:`~amct_hf.algorithms.convention.factor_problem`),
    naming the first unusable layer."""
    from ..algorithms.convention import factor_problem
    from ..errors import MissingFileError

    if isinstance(record, Mapping):
        factors = {name: (list(s), list(o)) for name, (s, o) in record.items()}
        where = "the given factors"
    else:
        path = os.fspath(record)
        where = f"record {path}"
        if not os.path.exists(path):
            raise MissingFileError(f"record file not found: {path}")
        if os.path.isdir(path):
            raise RecordFileError(f"record {path} is a directory, expected a record file")
        factors = read_kv_factors(path)
        if not factors:
            raise RecordFileError(f"record {path} has no kv_cache_value entries")
    for name, (scales, offsets) in factors.items():
        problem = factor_problem(scales, offsets)
        if problem:
            raise RecordFileError(f"{where}: layer {name!r} has unusable factors: {problem}")
    return factors, where


def uneditable_keys(record_file: str | os.PathLike) -> dict[str, str]:
    """Keys of the record's entries that a write cannot edit without loss -> why."""
    where = os.fspath(record_file)
    text = _read_text(os.path.realpath(where), where)
    if not text:
        return {}
    idx = _index(text, where)
    out = {}
    for i, field in enumerate(idx.fields):
        if field.entry is not None:
            continue
        sub = idx.subs[i]
        toks = Tokens(text, field.start, field.end)
        top = list(toks.fields(0, len(toks.toks)))
        if len(top) != 1 or top[0][3] is None or len(sub.record) != 1:
            for entry in sub.record:
                out.setdefault(entry.key, "uses the list form 'record: [...]'")
    return out
