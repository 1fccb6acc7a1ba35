"""Locate the top-level entries of a record's text without a full protobuf parse.

A protobuf text parse costs about 1.6 s per MB in Python, so parsing the whole record on
every write made the operator's layer-by-layer writes quadratic. Records we and AMCT print
are almost entirely *canonical* entries::

    record {
      key: "model.layers.0.self_attn.k_proj"
      kv_cache_value {
        scale: 0.027280478
        offset: -18
      }
    }

:func:`scan` matches those with one regular expression each (C speed) and splits anything
else into whole top-level fields with a tokenizer that mirrors ``text_format.Tokenizer``;
the caller parses those *foreign* fields with protobuf. The canonical pattern is a strict
subset of the text format whose meaning is known exactly:

* it starts at the beginning of a line: protobuf tokenizes line by line and no token spans
  a newline, so a line start is a token boundary;
* the key has no backslash, so its value is its text (protobuf's unescaping is the identity);
* a scale is a plain decimal number (no leading zero, lowercase exponent), ``inf``, ``-inf``
  or ``nan``: protobuf reads those with ``float()`` and stores the float32 nearest to it;
* an offset has at most 9 digits, so it is always inside the int32 range.

Anything else (comments inside an entry, ``value {}``, other layouts, escapes, ``1.0f``)
is a foreign field, so the fast path never has to agree with protobuf on a corner case.
"""
from __future__ import annotations

import re
import sys
from typing import NamedTuple

__all__ = ["CANONICAL_ENTRY", "Canonical", "Field", "Tokens", "scan", "skip_end"]

# Every line ends in "\n", so no backtracking can help a match: where Python (3.11+) has
# possessive quantifiers they only save time (~30%), the language is the same.
_P = "+" if sys.version_info >= (3, 11) else ""
_NUM = rf"-?(?:0|[1-9][0-9]*{_P})(?:\.[0-9]*{_P})?{_P}(?:e[+-]?[0-9]+{_P})?{_P}|-?inf|nan"
_INT = r"-?(?:0|[1-9][0-9]{0,8})"
CANONICAL_ENTRY = re.compile(
    r'record \{\n  key: "(?P<key>[^"\\\n]*)"\n'
    r"(?P<kv>  kv_cache_value \{\n"
    rf"(?P<s>(?:    scale: (?:{_NUM})\n)*{_P})"
    rf"(?P<o>(?:    offset: {_INT}\n)*{_P})"
    r"  \}\n)"
    r"\}(?=\n|\Z)")  # the newline after it is not part of the field

# Same token classes as text_format.Tokenizer, which tokenizes line by line,
# hence no DOTALL and strings that end at a newline.
_SKIP = re.compile(r"(?:\s|#[^\n]*)*")
_TOKEN = re.compile(
    r"(?P<skip>(?:\s|#[^\n]*)+)"
    r"|(?P<str>\"[^\"\n\\]*(?:(?:\\.)+[^\"\n\\]*)*(?:\"|\\?$)"
    r"|'[^'\n\\]*(?:(?:\\.)+[^'\n\\]*)*(?:'|\\?$))"
    r"|(?P<word>[a-zA-Z_][0-9a-zA-Z_+-]*|(?:[0-9+-]|\.[0-9])[0-9a-zA-Z_.+-]*)"
    r"|(?P<sym>.)", re.MULTILINE)
_OPEN, _CLOSE = "{<[", "}>]"


def skip_end(text: str, pos: int) -> int:
    """End of the whitespace and comments starting at ``pos``."""
    return _SKIP.match(text, pos).end()


class Tokens:
    """Tokens of ``text[start:end]`` (absolute positions) with their bracket pairs."""

    def __init__(self, text: str, start: int = 0, end: int | None = None):
        end = len(text) if end is None else end
        self.toks: list[tuple[str, str, int, int]] = []  # (kind, text, start, end)
        for m in _TOKEN.finditer(text, start, end):
            if m.lastgroup != "skip":
                self.toks.append((m.lastgroup, m.group(), m.start(), m.end()))
        # A mismatch means the text does not parse (or our tokenizer disagrees with
        # protobuf's): the caller must not edit.
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


class Canonical(NamedTuple):
    """A canonical entry's key and the (start, end) spans of its ``kv_cache_value`` block
    and of its scale and offset lines, in the scanned text."""
    key: str
    kv: tuple[int, int]
    s: tuple[int, int]
    o: tuple[int, int]

    def shifted(self, d: int) -> Canonical:
        return Canonical(self.key, *((a + d, b + d) for a, b in (self.kv, self.s, self.o)))


class Field(NamedTuple):
    """One top-level field: ``text[start:end]``; ``entry`` is set for a canonical entry."""
    start: int
    end: int
    entry: Canonical | None

    def shifted(self, d: int) -> Field:
        return Field(self.start + d, self.end + d, self.entry and self.entry.shifted(d))


def _next_token(text: str, pos: int):
    pos = skip_end(text, pos)
    if pos >= len(text):
        return None
    m = _TOKEN.match(text, pos)
    return m.lastgroup, m.group(), m.start(), m.end()


def _field_end(text: str, pos: int) -> int:
    """End of the top-level field whose first token starts at ``pos`` (as Tokens.fields)."""
    def group_end(tok):  # tok opens a bracket: end of its matching close
        stack = [tok[1]]
        while stack:
            tok = _next_token(text, tok[3])
            if tok is None:
                raise ValueError("unbalanced brackets")
            if tok[0] == "sym" and tok[1] in _OPEN:
                stack.append(tok[1])
            elif tok[0] == "sym" and tok[1] in _CLOSE:
                if _OPEN.index(stack.pop()) != _CLOSE.index(tok[1]):
                    raise ValueError("unbalanced brackets")
        return tok

    tok = _next_token(text, pos)
    last = group_end(tok) if tok[1] == "[" else tok
    nxt = _next_token(text, last[3])
    if nxt is not None and nxt[1] == ":":
        last, nxt = nxt, _next_token(text, nxt[3])
    if nxt is not None:
        if nxt[0] == "sym" and nxt[1] in _OPEN:
            last = group_end(nxt)
        elif nxt[0] == "str":
            while nxt is not None and nxt[0] == "str":
                last, nxt = nxt, _next_token(text, nxt[3])
        else:
            last = nxt
        nxt = _next_token(text, last[3])
    if nxt is not None and nxt[1] in (",", ";"):
        last = nxt
    return last[3]


def scan(text: str, start: int = 0) -> list[Field]:
    """Split ``text[start:]`` into its top-level fields, in file order (``start`` must be
    a field boundary).

    Whitespace and comments between fields belong to no field. Raises ValueError when the
    brackets do not balance; it does not check the foreign fields' syntax (parse them)."""
    fields: list[Field] = []
    pos, n = start, len(text)
    while True:
        pos = skip_end(text, pos)
        if pos >= n:
            return fields
        if pos == 0 or text[pos - 1] == "\n":
            m = CANONICAL_ENTRY.match(text, pos)
            if m:
                fields.append(Field(pos, m.end(), Canonical(
                    m.group("key"), m.span("kv"), m.span("s"), m.span("o"))))
                pos = m.end()
                continue
        end = _field_end(text, pos)
        fields.append(Field(pos, end, None))
        pos = end
