"""The record file: reading it for use, and merging factors into it safely (SPEC §4).

Writes are atomic (temp file + rename) and serialised across processes by a lock beside
the record; the text itself is merged by :mod:`~amct_hf.record.merge`, so nothing already
in the file is lost.
"""
from __future__ import annotations

import os
import stat
import warnings
from collections.abc import Mapping

from ..errors import OutputPathError, RecordFileError, RecordOverwriteWarning
from ..fileio import exclusive_lock, file_kind, replace_refusal, write_text_atomic
from ..settings.validate import lock_timeout_seconds
from .merge import RecordIndex, index_record, merge_record, read_factors, too_deep_error
from .scanner import Tokens
from .schema import Factors, validate_factors

__all__ = ["check_record_file", "load_kv_factors", "read_kv_factors", "uneditable_keys", "write_kv_factors"]

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
    return read_factors(_read_text(path, path), path)


def check_record_file(path: str | os.PathLike) -> None:
    """Refuse, before any calibration work, a record that ``write_kv_factors`` would refuse:
    not a regular file, read-only, in a directory that takes no new file, unreadable or
    unparsable. Entries with invalid values
    are not checked: a write keeps them untouched (only reading them fails)."""
    where = os.fspath(path)
    target = os.path.realpath(where)
    _refuse_target(target, where)
    _refuse_unwritable_dir(target, where)
    index_record(_read_text(target, where), where)


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
_last_write: dict[str, tuple[str, RecordIndex]] = {}


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
    new = validate_factors(factors)  # before any I/O: nothing is written if one entry is bad
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
            text, old, out_idx = merge_record(text, where, new, idx)

            write_text_atomic(target, text)
            _last_write[target] = (text, out_idx)
    except RecordFileError:
        raise
    except TimeoutError as e:
        raise RecordFileError(f"record {where}: {e}") from e
    except RecursionError:
        raise too_deep_error(where) from None
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
    idx = index_record(text, where)
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
