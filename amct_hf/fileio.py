"""Crash-safe file replacement and a self-cleaning lock, shared by the record writer and the
exporters.

Output paths
------------
A symlink is followed: the file it points to is replaced and the link is kept. The final
target must be absent or a regular file that may be written: a directory, FIFO, socket or
device node is never replaced (nor opened: a FIFO would block), and a file without any
write bit (e.g. 0444) is refused even for root, who would bypass the permission check.

Temp files
----------
The new content goes to ``.<name>.<pid>.<8 hex>.tmp`` beside the target. A writer killed
before its rename leaves one behind; the next write to the same target removes those whose
pid is no longer alive on this machine (never another target's, never a live writer's).

Lock
----
:func:`exclusive_lock` takes ``flock`` on ``<target>.lock`` and removes that file when
it releases it, so no lock file stays beside the record. Unlinking a lock file others may
be waiting on is made safe by checking, once the lock is held, that the path still names
the very file that was locked; a waiter that locked an unlinked file retries on the new
one. A writer killed while holding the lock leaves the file behind (the kernel drops the
lock itself); the next writer locks it, uses it and removes it. The holder writes its pid
into the file, so a waiter that times out can say who holds it. Older amct_hf versions,
which keep the lock file, do not follow this protocol: do not run both on one record at
the same time.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import math
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Iterator

from .errors import OutputPathError

__all__ = ["atomic_replace", "write_text_atomic", "exclusive_lock", "remove_stale_temps", "dead_writers_names",
           "replace_refusal", "check_output_path", "fsync_dir", "writable_dir_problem", "pid_alive"]

logger = logging.getLogger("amct_hf")

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def file_kind(mode: int) -> str:
    for test, kind in _KINDS:
        if test(mode):
            return kind
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


def replace_refusal(path: str) -> str | None:
    """Why ``path`` (symlinks followed) must not be replaced, or None when it may be."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"cannot be examined ({e.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return f"is {file_kind(st.st_mode)}, not a regular file"
    mode = stat.S_IMODE(st.st_mode)
    # root passes os.access whatever the mode, hence the explicit look at the write bits
    if not mode & 0o222 or not os.access(path, os.W_OK):
        return f"is read-only (mode {mode:04o})"
    return None


def _temp_pattern(path: str) -> re.Pattern:
    return re.compile(rf"\.{re.escape(os.path.basename(path))}\.([0-9]+)\.[0-9a-f]{{8}}\.tmp")


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` may be a live process of this machine (True when unsure)."""
    if pid <= 0:
        return True  # not a pid we wrote: leave the file alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, owned by someone else
        return True
    return True


def dead_writers_names(directory: str, pattern: re.Pattern) -> list[str]:
    """Names in ``directory`` matching ``pattern`` (group 1: the writer's pid) whose writer
    is neither this process nor alive: what a killed writer left behind."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    dead = []
    for name in names:
        m = pattern.fullmatch(name)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            dead.append(name)
    return dead


def remove_stale_temps(path: str) -> list[str]:
    """Remove the temp files :func:`atomic_replace` left for ``path`` whose writer is dead."""
    d = os.path.dirname(path) or "."
    removed = []
    for name in dead_writers_names(d, _temp_pattern(path)):
        try:
            os.unlink(os.path.join(d, name))
            removed.append(name)
        except OSError:
            pass
    return removed


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

    ``path`` is resolved through symlinks; a target that exists and is not a writable
    regular file is refused with :class:`OutputPathError` before anything is written.
    The result keeps the mode of the file it replaces, or gets the mode ``open()`` would
    give a new file (0o666 through the umask; some writers create 0o600 files)."""
    path = os.path.realpath(path)
    problem = replace_refusal(path)
    if problem:
        raise OutputPathError(f"output {path} {problem}; left untouched")
    d = os.path.dirname(path) or "."
    os.makedirs(d, exist_ok=True)
    remove_stale_temps(path)
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
    fsync_dir(d)  # make the rename itself durable


def write_text_atomic(path: str, text: str) -> None:
    """:func:`atomic_replace` of ``path`` by ``text`` in UTF-8, line endings as given."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    atomic_replace(path, write)


def fsync_dir(path: str) -> None:
    """Make renames inside ``path`` durable (best effort: some filesystems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


# --------------------------------------------------------------------------- lock
def _holder(lock_path: str) -> str:
    try:
        with open(lock_path, "rb") as f:
            pid = f.read(32).strip()
    except OSError:
        return ""
    return f" (held by pid {pid.decode()})" if pid.isdigit() else ""


@contextlib.contextmanager
def exclusive_lock(lock_path: str, timeout: float | None = None, *,
                   notice_after: float = 10.0) -> Iterator[None]:
    """Hold ``flock`` on ``lock_path``, removing the file on release (see module doc).

    ``timeout`` seconds (None: forever) bounds the wait; past it, :class:`TimeoutError`
    names the lock file and its holder's pid. A wait longer than ``notice_after`` seconds
    is logged once."""
    start = time.monotonic()
    delay, noticed = 0.001, False
    while True:
        # O_NOFOLLOW / O_NONBLOCK: a symlink or FIFO planted at the lock path is not opened
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                         | os.O_CLOEXEC, 0o666)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise OutputPathError(f"lock file {lock_path} is a symlink; remove it") from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OutputPathError(f"lock file {lock_path} is {file_kind(st.st_mode)}; "
                                      "remove it")
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    waited = time.monotonic() - start
                    if timeout is not None and waited >= timeout:
                        raise TimeoutError(
                            f"timed out after {timeout:g} s waiting for the lock file "
                            f"{lock_path}{_holder(lock_path)}; is that writer stopped?") from None
                    if not noticed and waited >= notice_after:
                        noticed = True
                        logger.warning("waiting for the lock file %s%s", lock_path,
                                       _holder(lock_path))
                    left = math.inf if timeout is None else timeout - waited
                    time.sleep(max(0.0, min(delay, left)))
                    delay = min(delay * 2, 0.05)
            try:
                now = os.stat(lock_path, follow_symlinks=False)
            except FileNotFoundError:
                now = None
            if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                continue  # the holder removed it while we waited: lock the current one
            try:
                os.ftruncate(fd, 0)
                os.write(fd, b"%d\n" % os.getpid())
            except OSError:
                pass  # the pid is only a diagnostic
            try:
                yield
            finally:
                try:  # unlink while still holding the lock (see module doc)
                    os.unlink(lock_path)
                except OSError:
                    pass
            return
        finally:
            os.close(fd)


def writable_dir_problem(path: str) -> str | None:
    """Why nothing can be created at ``path`` (its nearest existing ancestor directory is
    not writable: permissions, a read-only filesystem, a regular file in the way), or
    None. Tried for real with a probe directory, removed at once: ``os.access`` says yes
    to root on a read-only filesystem."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is not a directory"
    # named like the export writer's temp directories, so a probe a kill left behind is
    # removed by the next export (it is empty anyway)
    probe = os.path.join(parent, f".{os.path.basename(path)}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.mkdir(probe)
    except OSError as e:
        return f"cannot create anything in {parent} ({e.strerror})"
    os.rmdir(probe)
    return None
