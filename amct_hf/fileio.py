"""Crash-safe file replacement shared by the record writer and the exporters."""
from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable

__all__ = ["atomic_replace", "looks_like_path", "check_output_path"]


def looks_like_path(name: str) -> bool:
    """Whether a name was meant as a local path rather than a hub id (``name`` or
    ``owner/name``): absolute, starting with ``.`` or ``~``, ending in ``/``, holding a
    backslash, or with more than one ``/``. A typo in such a name then fails at once as
    a missing path instead of after minutes of hub retries."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.endswith("/")
            or "\\" in name or name.count("/") > 1)


def check_output_path(source: str, out_path: str) -> None:
    """An output written from ``source`` must not be ``source`` itself nor a directory."""
    from .errors import ExportError
    if os.path.exists(out_path) and os.path.exists(source) and os.path.samefile(source, out_path):
        raise ExportError(f"output {out_path} is the record file itself; choose another --out")
    if os.path.isdir(out_path):
        raise ExportError(f"output {out_path} is a directory, expected a file path")


def atomic_replace(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, make it durable, then rename
    it over ``path``: a crash or kill leaves either the old or the new complete file.

    The result keeps the mode of the file it replaces, or gets the mode ``open()`` would
    give a new file (0o666 through the umask; some writers create 0o600 files)."""
    d = os.path.dirname(path) or "."
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            mode = stat.S_IMODE(os.stat(tmp).st_mode)
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
