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

* the whole file is parsed with ``allow_unknown_field=True`` — this validates
  syntax and type of every *known* field (``scale: oops`` is an error) while
  tolerating fields we do not know;
* a small tokenizer (mirroring ``text_format.Tokenizer``) splits the text into
  top-level entries; entries we do not modify are copied byte for byte,
  comments and layout included;
* in an entry whose ``kv_cache_value`` is replaced, only that sub-block is cut
  out and a freshly printed one inserted, so its ``key``/``value {}``/unknown
  fields stay as they were;
* new layers are appended, printed by ``text_format`` exactly as AMCT prints.

The merged text is parsed again and checked before it replaces the file.
"""
from __future__ import annotations

import logging
import math
import operator
import os
import re
import struct
import warnings
from collections.abc import Mapping, Sequence

from filelock import FileLock
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

from .errors import RecordFileError, RecordOverwriteWarning
from .fileio import atomic_replace

__all__ = [
    "load_kv_factors",
    "RecordFileError",
    "RecordOverwriteWarning",
    "ScaleOffsetRecord",
    "format_record",
    "parse_record_text",
    "read_kv_factors",
    "write_kv_factors",
]

logger = logging.getLogger("amct_hf")

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


def _kv_dict(rec) -> dict[str, tuple[list[float], list[int]]]:
    # Duplicate keys: the last entry wins, as when AMCT builds its dict.
    return {e.key: (list(e.kv_cache_value.scale), list(e.kv_cache_value.offset))
            for e in rec.record if e.HasField("kv_cache_value")}


# --------------------------------------------------------------------------- validation
_I32 = (-(2 ** 31), 2 ** 31 - 1)


def _f32(x: float) -> float:
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
                v = _f32(float(s))
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


def format_record(factors: Factors) -> str:
    """Text of a fresh record holding only these layers, exactly as AMCT prints it."""
    rec = ScaleOffsetRecord()
    for name, (scales, offsets) in _validate(factors).items():
        entry = rec.record.add(key=name)
        _fill_kv(entry.kv_cache_value, scales, offsets)
    return _print(rec)


def parse_record_text(text: str) -> dict[str, tuple[list[float], list[int]]]:
    """Layer -> (scales, offsets) of the entries with ``kv_cache_value`` in ``text``."""
    return _kv_dict(_parse(text, "<text>"))


# --------------------------------------------------------------------------- tokenizer
# Same token classes as text_format.Tokenizer, which tokenizes line by line,
# hence no DOTALL and strings that end at a newline.
_TOKEN = re.compile(
    r"(?P<skip>(?:\s|#[^\n]*)+)"
    r"|(?P<str>\"[^\"\n\\]*(?:(?:\\.)+[^\"\n\\]*)*(?:\"|\\?$)"
    r"|'[^'\n\\]*(?:(?:\\.)+[^'\n\\]*)*(?:'|\\?$))"
    r"|(?P<word>[a-zA-Z_][0-9a-zA-Z_+-]*|(?:[0-9+-]|\.[0-9])[0-9a-zA-Z_.+-]*)"
    r"|(?P<sym>.)", re.MULTILINE)
_OPEN, _CLOSE = "{<[", "}>]"


class _Tokens:
    def __init__(self, text: str):
        self.toks: list[tuple[str, str, int, int]] = []  # (kind, text, start, end)
        for m in _TOKEN.finditer(text):
            if m.lastgroup != "skip":
                self.toks.append((m.lastgroup, m.group(), m.start(), m.end()))
        # The parser already accepted the text, so brackets balance; a mismatch
        # means our tokenizer disagrees with protobuf's, and we must not edit.
        self.match: dict[int, int] = {}
        stack = []
        for i, (kind, tok, _, _) in enumerate(self.toks):
            if kind == "sym" and tok in _OPEN:
                stack.append(i)
            elif kind == "sym" and tok in _CLOSE:
                if not stack or _OPEN.index(self.toks[stack[-1]][1]) != _CLOSE.index(tok):
                    raise ValueError("unbalanced brackets")
                self.match[stack.pop()] = i
        if stack:
            raise ValueError("unbalanced brackets")

    def fields(self, i: int, end: int):
        """Fields between token i and end: (name, first_tok, last_tok, body_open or None)."""
        t = self.toks
        while i < end:
            first = i
            name = t[i][1]
            i = self.match[i] + 1 if t[i][1] == "[" else i + 1  # [extension] names
            if i < end and t[i][1] == ":":
                i += 1
            body = None
            if i < end and t[i][0] == "sym" and t[i][1] in _OPEN:
                if t[i][1] != "[":
                    body = i
                i = self.match[i] + 1
            elif i < end and t[i][0] == "str":
                while i < end and t[i][0] == "str":  # adjacent strings concatenate
                    i += 1
            else:
                i += 1
            if i < end and t[i][1] in (",", ";"):
                i += 1
            yield name, first, i - 1, body


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


def _kv_block(text: str, toks: _Tokens, open_i: int, close_i: int, kv) -> tuple[int, str]:
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
    body = "".join(indent + "  " + line + "\n" for line in _print(kv).splitlines())
    return line_start, f"{indent}kv_cache_value {{\n{body}{indent}}}\n"


def _merge(text: str, where: str, new: dict[str, tuple[list[float], list[int]]]):
    """Merged text and {layer: (old_scales, old_offsets)} of the layers overwritten."""
    before = _kv_dict(_parse(text, where))  # validates, with the parser's line:column errors
    try:
        toks = _Tokens(text)
    except ValueError as e:
        raise RecordFileError(f"record {where}: cannot split into entries ({e})") from None
    edits: list[tuple[int, int, str]] = []
    old: dict[str, tuple[list[float], list[int]]] = {}
    holders: dict[str, list] = {}  # layer -> its entries (duplicate keys happen), in file order
    for name, first, last, body in toks.fields(0, len(toks.toks)):
        if name != "record":
            continue
        s, e = toks.toks[first][2], toks.toks[last][3]
        sub = _parse(text[s:e], where)
        for entry in sub.record:
            if entry.key in new:
                holders.setdefault(entry.key, []).append((entry, s, e, body, sub))
    for layer, entries in holders.items():
        with_kv = [h for h in entries if h[0].HasField("kv_cache_value")]
        if with_kv:
            kv = with_kv[-1][0].kv_cache_value  # the one a reader sees
            old[layer] = (list(kv.scale), list(kv.offset))
        # Replace every copy so that readers agree whichever duplicate they take;
        # with none, the last entry of that key gains the block (next to its value {}).
        for entry, s, e, body, sub in (with_kv or entries[-1:]):
            if body is None or len(sub.record) != 1:
                raise RecordFileError(
                    f"record {where}: the entry for layer {layer!r} uses the list form "
                    f"'record: [...]', which cannot be edited without loss")
            close = toks.match[body]
            for fname, f0, f1, _ in toks.fields(body + 1, close):
                if fname == "kv_cache_value":
                    a, b = _line_span(text, toks.toks[f0][2], toks.toks[f1][3])
                    edits.append((a, b, ""))
            kv = _KVRecord()
            _fill_kv(kv, *new[layer])
            pos, block = _kv_block(text, toks, body, close, kv)
            edits.append((pos, pos, block))
    out = text
    for a, b, repl in sorted(edits, key=lambda x: (x[0], x[1]), reverse=True):
        out = out[:a] + repl + out[b:]
    fresh = {k: v for k, v in new.items() if k not in holders}
    if fresh:
        if out and not out.endswith("\n"):
            out += "\n"
        out += format_record(fresh)
    got = _kv_dict(_parse(out, f"{where} (merged)"))
    if got != {**before, **new}:  # every layer, not only the written ones
        raise RecordFileError(f"record {where}: internal merge check failed; file left untouched")
    return out, old


# --------------------------------------------------------------------------- file I/O
def _read_text(path: str, where: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return ""
    except OSError as e:  # IsADirectoryError, PermissionError, ...
        raise RecordFileError(f"record {where}: cannot read: {e}") from e
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordFileError(f"record {where} does not parse: not UTF-8 text ({e})") from e


def read_kv_factors(path: str | os.PathLike) -> dict[str, tuple[list[float], list[int]]]:
    """Layer name -> (scales, offsets) of every entry with ``kv_cache_value``.

    A missing or empty file gives ``{}``. No lock is taken: writers replace the
    file atomically, so a reader always sees a complete file.
    """
    path = os.fspath(path)
    return _kv_dict(_parse(_read_text(path, path), path))


def _atomic_write(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(text.encode("utf-8"))
    atomic_replace(path, write)


def _changed(old: tuple[list[float], list[int]], new: tuple[list[float], list[int]]) -> str:
    fields = [n for n, a, b in zip(("scale", "offset"), old, new) if list(a) != list(b)]
    return ", ".join(fields) or "unchanged values"


def write_kv_factors(path: str | os.PathLike, factors: Factors, *,
                     lock_timeout: float = -1) -> list[str]:
    """Merge ``factors`` (layer -> (scales, offsets)) into the record file at ``path``.

    Each layer's ``kv_cache_value`` is replaced or inserted; everything else in
    the file is kept as it was, new layers are appended. The read-modify-write
    runs under ``FileLock(path + ".lock")`` and the file is replaced atomically.
    Returns the layers whose existing ``kv_cache_value`` was overwritten, each
    reported by a ``RecordOverwriteWarning`` and a log message.

    Raises ``ValueError`` for invalid factors and ``RecordFileError`` when the
    existing file cannot be read, parsed or replaced; in both cases the file is
    untouched. ``lock_timeout`` (seconds, -1 = wait forever) bounds the lock wait.
    An empty ``factors`` writes nothing and does not create the file.
    """
    new = _validate(factors)  # before any I/O: nothing is written if one entry is bad
    if not new:
        return []
    where = os.fspath(path)
    target = os.path.realpath(where)  # write through a symlink rather than replace it
    if os.path.isdir(target):
        raise RecordFileError(f"record {where}: is a directory")
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with FileLock(target + ".lock", timeout=lock_timeout):
            text, old = _merge(_read_text(target, where), where, new)
            _atomic_write(target, text)
    except RecordFileError:
        raise
    except OSError as e:  # filelock.Timeout is an OSError too
        raise RecordFileError(f"record {where}: cannot write: {e}") from e
    for layer, before in old.items():
        msg = (f"record {where}: layer {layer!r} already had kv_cache_value; "
               f"overwritten fields: {_changed(before, new[layer])}")
        logger.warning(msg)
        warnings.warn(msg, RecordOverwriteWarning, stacklevel=2)
    return [layer for layer in new if layer in old]


def load_kv_factors(record) -> tuple[dict[str, tuple[list[float], list[int]]], str]:
    """The factors to *use* (INT8 cache, evaluation, exports, report) and a description of
    where they came from: a record file that must exist and hold ``kv_cache_value``
    entries, or a ``{record key: (scales, offsets)}`` mapping. Every entry is checked
    with the INT8 convention (:func:`~amct_hf.algorithms.convention.factor_problem`),
    naming the first unusable layer."""
    from .algorithms.convention import factor_problem
    from .errors import MissingFileError

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
