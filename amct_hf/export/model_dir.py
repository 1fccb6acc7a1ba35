"""Write an export model directory: the source checkpoint's safetensors weights copied
shard by shard, with tensors and files added: the part shared by every model-directory export.

* Streaming: the output is planned from the safetensors headers alone (names, dtypes,
  shapes), then written one output shard at a time; only the tensors of the shard being
  written are in memory, and each source file is opened (memory-mapped) only while that
  shard reads from it, so a 70B model needs memory for one shard, not for the model.
* Shards: at most ``max_shard_size`` bytes of tensor data each (a single larger tensor
  gets a shard of its own, as ``transformers``' ``save_pretrained`` does), named
  ``{prefix}-0000k-of-0000n.safetensors``, with ``{prefix}.safetensors.index.json``
  (``{"metadata": {"total_size"}, "weight_map"}``, the layout ``from_pretrained``,
  vLLM and vllm-ascend read).
* Crash safety: everything is written into a temporary directory beside ``out_dir``,
  made durable, then renamed into place; a crash leaves no half directory.
* Copied tensors are bit-identical (same dtype, shape and bytes); tied weights absent
  from the files (``lm_head.weight`` of a model with tied embeddings) are written as
  tensors of their own, as msModelSlim's exports hold them.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Mapping

from ..errors import ExportError
from ..fileio import exclusive_lock, fsync_dir
from ..settings.validate import size_in_bytes
from .checks import check_written_tensors
from .source_model import SourceModel, TensorInfo

__all__ = ["DEFAULT_MAX_SHARD_SIZE", "parse_size", "check_out_dir", "write_model_dir",
           "remove_dead_writers_leftovers"]

DEFAULT_MAX_SHARD_SIZE = 5 * 10 ** 9  # "5GB", transformers' unit convention (10**9)

# Weight files of any format are never copied as "other files"; hidden files (caches,
# our own conversion marker) neither.
_WEIGHT_FILE = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.ckpt|\.gguf|\.h5|\.msgpack"
                          r"|\.safetensors\.index\.json|\.bin\.index\.json)$")


def parse_size(size: int | str) -> int:
    """Bytes from ``5000000000``, ``"5GB"`` (10**9) or ``"4GiB"`` (2**30); must be > 0."""
    return size_in_bytes(size, "shard size", ExportError)


def check_out_dir(out_dir: str | os.PathLike, model_dir: str | os.PathLike, overwrite: bool) -> str:
    """Refuse an existing non-empty ``out_dir`` (unless ``overwrite``) and any ``out_dir``
    that is, contains or lies inside the model directory (overwriting it would delete the
    source; inside it, it would change the source). A symlink is followed, as the record
    writer follows one: the directory it points to is replaced, the link kept; the path
    returned is the one written."""
    out_dir = _followed(os.path.abspath(os.fspath(out_dir)))
    src = os.path.realpath(os.fspath(model_dir))
    real_out = os.path.realpath(out_dir)
    if real_out == src or src.startswith(real_out.rstrip(os.sep) + os.sep):
        raise ExportError(f"output {out_dir} is (or contains) the model directory; choose another --out")
    if real_out.startswith(src.rstrip(os.sep) + os.sep):
        raise ExportError(f"output {out_dir} is inside the model directory {src}; the export would "
                          f"add a directory to the source model: choose an --out outside it")
    if os.path.lexists(out_dir):
        if not os.path.isdir(out_dir):
            raise ExportError(f"output {out_dir} exists and is not a directory")
        if os.listdir(out_dir) and not overwrite:
            raise ExportError(f"output directory {out_dir} exists and is not empty; "
                              f"pass --overwrite (overwrite=True) to replace it")
    return out_dir


def _plan_shards(tensors: list[TensorInfo], cap: int) -> list[list[TensorInfo]]:
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > cap:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _write_shard(path: str, infos: list[TensorInfo], added: Mapping[str, object]) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = {}
    by_file: dict[str, list[TensorInfo]] = {}
    for t in infos:
        if t.name in added:
            tensors[t.name] = added[t.name]
        else:
            by_file.setdefault(t.source_file, []).append(t)
    for source, items in by_file.items():
        with safe_open(source, framework="pt", device="cpu") as f:
            for t in items:
                tensors[t.name] = f.get_tensor(t.source_name)
    # A materialised tied weight shares storage with its source when both land in one
    # shard; safetensors refuses shared storage, so give it its own copy.
    ptrs: set = set()
    for name, tensor in tensors.items():
        ptr = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        if ptr is not None and ptr in ptrs:
            tensors[name] = tensor.clone()
        elif ptr is not None:
            ptrs.add(ptr)
    ordered = {t.name: tensors[t.name] for t in infos}
    save_file(ordered, path, metadata={"format": "pt"})
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_model_dir(source: SourceModel, out_dir: str | os.PathLike, *,
                    added_tensors: Mapping[str, object], weights_prefix: str,
                    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False,
                    extra_json: Mapping[str, object] | None = None,
                    edit_config: Callable[[dict], dict] | None = None,
                    replaced_tensors: Mapping[str, object] | None = None) -> dict:
    """Write ``out_dir``: the source's tensors plus ``added_tensors`` (name -> torch tensor,
    appended after them), with ``replaced_tensors`` (name -> tensor of the source's
    dtype and shape) written in place of the source's own, the index, every other file of the model directory (verbatim,
    except ``config.json`` when ``edit_config`` is given), and ``extra_json`` files.

    Returns ``{"out_dir", "files", "weight_map", "total_size"}``. ``out_dir`` is checked
    first (:func:`check_out_dir`); nothing exists at ``out_dir`` until the complete
    directory is renamed there.
    """
    cap = parse_size(max_shard_size)
    out_dir = check_out_dir(out_dir, source.model_dir, overwrite)
    names = {t.name for t in source.tensors}
    clash = [n for n in added_tensors if n in names]
    if clash:
        raise ExportError(f"{source.model_dir} already has a tensor named {clash[0]!r}; "
                          f"it looks like an exported directory already")
    replaced = dict(replaced_tensors or {})
    stored = {t.name: t for t in source.tensors}
    for name, tensor in replaced.items():
        old = stored.get(name)
        if old is None or list(tensor.shape) != old.shape or tensor.numel() * tensor.element_size() != old.nbytes:
            raise ExportError(f"cannot replace tensor {name!r}: not in {source.model_dir} with that shape and size")
    infos = list(source.tensors)
    for name, tensor in added_tensors.items():
        infos.append(TensorInfo(name, "", list(tensor.shape),
                                 tensor.numel() * tensor.element_size(), "", name))
    shards = _plan_shards(infos, cap)
    n = len(shards)
    shard_names = [f"{weights_prefix}-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]

    check_written_tensors({**added_tensors, **replaced}, f"export of {source.model_dir} to {out_dir}")

    parent = os.path.dirname(out_dir) or "."
    os.makedirs(parent, exist_ok=True)
    remove_dead_writers_leftovers(out_dir)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    restore_sigterm = _sigterm_raises()  # so that the except below removes tmp on SIGTERM too
    try:
        os.mkdir(tmp)
        weight_map: dict[str, str] = {}
        for shard_name, infos_k in zip(shard_names, shards):
            _write_shard(os.path.join(tmp, shard_name), infos_k, {**added_tensors, **replaced})
            weight_map.update({t.name: shard_name for t in infos_k})
        total = sum(t.nbytes for t in infos)
        files = {f"{weights_prefix}.safetensors.index.json":
                 {"metadata": {"total_size": total}, "weight_map": weight_map}}
        files.update(extra_json or {})
        for name in sorted(os.listdir(source.model_dir)):
            src = os.path.join(source.model_dir, name)
            if name.startswith(".") or _WEIGHT_FILE.search(name) or not os.path.isfile(src):
                continue
            if name in files:
                raise ExportError(f"{source.model_dir} already has a file named {name!r}; "
                                  f"it looks like an exported directory already")
            if name == "config.json" and edit_config is not None:
                with open(src, encoding="utf-8") as f:
                    files[name] = edit_config(json.load(f))
                continue
            shutil.copyfile(src, os.path.join(tmp, name))
        for name, doc in files.items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
        fsync_dir(tmp)
        _replace_dir_checked(tmp, out_dir, source.model_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        restore_sigterm()
    return {"out_dir": out_dir, "files": sorted(os.listdir(out_dir)), "weight_map": weight_map,
            "total_size": total}


def _replace_dir(tmp: str, out_dir: str) -> None:
    """Rename the finished ``tmp`` to ``out_dir``; an existing one (empty, or allowed to be
    overwritten) is moved aside first and deleted only once the new one is in place."""
    parent = os.path.dirname(out_dir) or "."
    old = None
    if os.path.lexists(out_dir):
        old = os.path.join(parent, f".{os.path.basename(out_dir)}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.rename(old, out_dir)
        raise
    fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _followed(out_dir: str) -> str:
    """``out_dir`` with a symlink at its end followed (to the path it names, made absolute)."""
    if os.path.islink(out_dir):
        return os.path.realpath(out_dir)
    return out_dir


def _leftover_pattern(out_dir: str) -> re.Pattern:
    return re.compile(rf"\.{re.escape(os.path.basename(out_dir))}\.tmp-([0-9]+)-[0-9a-f]{{8}}")


def remove_dead_writers_leftovers(out_dir: str) -> list[str]:
    """Remove the ``.<out>.tmp-<pid>-<hex>`` directories a writer of ``out_dir`` killed
    before its cleanup (SIGKILL, power loss) left beside it, when that pid is no longer
    alive on this machine; a live writer's are never touched. A ``.old-`` directory is
    never removed here: a writer killed between its two renames leaves the previous
    output only there."""
    from ..fileio import dead_writers_names

    parent = os.path.dirname(out_dir) or "."
    removed = dead_writers_names(parent, _leftover_pattern(out_dir))
    for name in removed:
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    return removed


def _sigterm_raises():
    """Make SIGTERM raise SystemExit(143) in the main thread (the default handler would end
    the process without the cleanup of the temp directory); returns the undo."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)
    if previous not in (signal.SIG_DFL, None):
        return lambda: None  # the application handles SIGTERM itself

    def handler(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _replace_dir_checked(tmp: str, out_dir: str, model_dir: str, overwrite: bool) -> None:
    """The final rename, under a lock beside ``out_dir`` and after checking ``out_dir``
    again: another export that finished into the same ``out_dir`` since the first check
    is refused (unless ``overwrite``) instead of being silently replaced."""
    parent = os.path.dirname(out_dir) or "."
    with exclusive_lock(os.path.join(parent, f".{os.path.basename(out_dir)}.lock")):
        check_out_dir(out_dir, model_dir, overwrite)
        _replace_dir(tmp, out_dir)
