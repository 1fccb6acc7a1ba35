"""Merging factors into a record's text without losing anything a reader put there.

A file may hold entries this package does not understand: other tools' ``value {}``
records, ``prune_record`` bodies (AMCT's ``PruneNode``/``AttrProto`` types are not part
of the spec, so ``PruneRecord`` is declared empty), or fields from a newer AMCT schema.
Re-printing a parsed message would silently drop whatever the schema lacks, so a merge
never re-prints existing content:

* :mod:`~amct_hf.record.scanner` splits the text into top-level fields: the entries we
  and AMCT print are matched by one exact pattern (a protobuf parse costs ~1.6 s per MB,
  which made layer-by-layer writes quadratic), every other field is parsed alone by
  protobuf with ``allow_unknown_field=True`` -- this validates syntax and type of every
  *known* field (``scale: oops`` is an error, reported with the whole-file parser's
  line:column) while tolerating fields we do not know;
* fields we do not modify are copied byte for byte, comments and layout included;
* in an entry whose ``kv_cache_value`` is replaced, only that sub-block is cut out and a
  freshly printed one inserted, so its ``key``/``value {}``/unknown fields stay as they were;
* new layers are appended, printed by ``text_format`` exactly as AMCT prints.

The edited entries and the appended text are scanned again and must read back the values
written before the merged text replaces the file. An entry we do not write is never
judged by its values: one holding ``scale: nan`` is kept as it is (reading it fails,
naming the layer).
"""
from __future__ import annotations

import math
import re
from array import array
from typing import NamedTuple

from google.protobuf import text_format

from ..errors import RecordFileError
from . import scanner as record_scan
from .scanner import Tokens
from .schema import KVRecord, ScaleOffsetRecord, fill_kv, format_record, kv_text, parse_text, print_text

__all__ = ["RecordIndex", "index_record", "merge_record", "parse_record_text", "read_factors", "too_deep_error"]

# --------------------------------------------------------------------------- index
_Values = "tuple[list[float], list[int]]"


class _Entry(NamedTuple):
    """One ``record`` entry: its key, the top-level field holding it, and its
    ``kv_cache_value`` (a canonical match, values parsed by protobuf, or None)."""
    key: str
    field: int
    kv: object


class RecordIndex(NamedTuple):
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
    parse_text(text, where)  # the part parses alone: ask the whole file
    raise RecordFileError(f"record {where}: cannot split into entries ({reason})")


def index_record(text: str, where: str, start: int = 0) -> RecordIndex:
    """Entries of ``text`` (from ``start``), validated; see record_scan for the fast path."""
    try:
        return _index_fields(text, where, start)
    except RecursionError:
        raise too_deep_error(where) from None


def too_deep_error(where: str) -> RecordFileError:
    # protobuf's text parser recurses once per level of nested (unknown) fields
    return RecordFileError(f"record {where} does not parse: fields are nested more deeply than "
                           f"the protobuf text parser can follow; left untouched")


def _index_fields(text: str, where: str, start: int = 0) -> RecordIndex:
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


def _make_index(fields: list, subs: dict) -> RecordIndex:
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
    return RecordIndex(fields, entries, subs)


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


def read_factors(text: str, where: str) -> dict[str, tuple[list[float], list[int]]]:
    # Duplicate keys: the last entry wins, as when AMCT builds its dict.
    last = {e.key: e.kv for e in index_record(text, where).entries if e.kv is not None}
    out = {}
    for layer, kv in last.items():
        out[layer] = _values(kv, text)
        _check_values(where, layer, *out[layer])
    return out


def parse_record_text(text: str) -> dict[str, tuple[list[float], list[int]]]:
    """Layer -> (scales, offsets) of the entries with ``kv_cache_value`` in ``text``.

    Raises RecordFileError when the text does not parse or an entry holds a scale that
    is not finite and positive, or scales and offsets of different (or zero) lengths."""
    return read_factors(text, "<text>")


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
        return close_pos, f"kv_cache_value {{ {print_text(kv, as_one_line=True)} }} "
    indent = text[line_start:close_pos] + "  "
    if close_i > open_i + 1:  # follow the indentation of the entry's first field
        first = toks.toks[open_i + 1][2]
        fls = text.rfind("\n", 0, first) + 1
        if not text[fls:first].strip():
            indent = text[fls:first]
    return line_start, _indented_kv(indent, kv)


def _indented_kv(indent: str, kv) -> str:
    body = kv_text(list(kv.scale), list(kv.offset), indent + "  ")
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


def merge_record(text: str, where: str, new: dict[str, tuple[list[float], list[int]]],
           idx: RecordIndex | None = None):
    """The merged text and {layer: (old_scales, old_offsets)} of the layers
    overwritten. Only the fields holding a written layer are touched (and checked again
    afterwards); every other byte is copied, so the cost is one scan of the text, none
    when ``idx`` (the index of this very text) is given. Also returns the merged text's
    index, built from ``idx`` and the fields scanned again."""
    idx = idx or index_record(text, where)
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
        kv = KVRecord()
        fill_kv(kv, *new[layer])
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


def _check_merge(out, where, new, idx, edits, touched, tail_len) -> RecordIndex:
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
        got = index_record(out[:b], f"{where} (merged)", a)
        if len(got.fields) != 1 or got.fields[0].end != b:
            fail(f"layer {layer!r} no longer one entry")
        keys = [e.key for e in idx.entries if e.field == i]
        if [e.key for e in got.entries] != keys:
            fail(f"keys of the entry of {layer!r} changed")
        checked += [e for e in got.entries if e.key in new]
        if 0 in got.subs:
            subs[len(fields)] = got.subs[0]
        fields.append(got.fields[0])
    got = index_record(out, f"{where} (merged)", len(out) - tail_len)
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

