"""Copy a Hugging Face model directory's safetensors weights into a new directory, shard
by shard, adding tensors and files: the part shared by every deployable export.

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
from dataclasses import dataclass, field

from ..errors import ExportError
from ..fileio import fsync_dir

__all__ = [
    "DEFAULT_MAX_SHARD_SIZE", "SourceModel", "parse_size", "read_source_model",
    "check_out_dir", "read_tensor", "write_model_dir",
]

DEFAULT_MAX_SHARD_SIZE = 5 * 10 ** 9  # "5GB", transformers' unit convention (10**9)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40,
          "K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "T": 10 ** 12}
# safetensors header dtype -> bytes per element
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
                "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
                "I64": 8, "U64": 8, "F64": 8}
# Weight files of any format are never copied as "other files"; hidden files (caches,
# our own conversion marker) neither.
_WEIGHT_FILE = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.ckpt|\.gguf|\.h5|\.msgpack"
                          r"|\.safetensors\.index\.json|\.bin\.index\.json)$")


def parse_size(size: int | str) -> int:
    """Bytes from ``5000000000``, ``"5GB"`` (10**9) or ``"4GiB"`` (2**30); must be > 0."""
    if isinstance(size, bool):
        raise ExportError(f"bad shard size {size!r}")
    if isinstance(size, int):
        n = size
    else:
        m = _SIZE.match(str(size))
        unit = m.group(2).upper() if m else None
        if not m or unit not in _UNITS:
            raise ExportError(f"bad shard size {size!r}: expected e.g. 5GB, 200MB or 4GiB")
        n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ExportError(f"bad shard size {size!r}: must be positive")
    return n


@dataclass
class _TensorInfo:
    name: str
    dtype: str           # safetensors dtype string ("F32", "BF16", ...)
    shape: list[int]
    nbytes: int
    source_file: str     # the file the bytes are read from
    source_name: str     # the name inside that file (differs for materialised tied weights)


@dataclass
class SourceModel:
    """What an export needs to know about a model directory, read without loading weights."""
    model_dir: str
    config: object                    # transformers PretrainedConfig
    dtype: object                     # torch.dtype the engines run it in
    tensors: list[_TensorInfo]        # in file order, tied weights appended
    kv_layout: dict                   # record key -> amct_hf KVSlot (execution order)
    meta_model: object = field(repr=False)


def _read_header(path: str) -> dict:
    # Only the header: its layout is the safetensors format's (8-byte little-endian length,
    # then JSON); reading it needs no tensor memory at all.
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > 100 * 2 ** 20:
                raise ValueError(f"header length {n}")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise ExportError(f"{path} is not a readable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    return header


def _source_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ExportError(f"{index} is not a valid safetensors index ({e})") from None
        files = list(dict.fromkeys(weight_map.values()))
        missing = [n for n in files if not os.path.isfile(os.path.join(model_dir, n))]
        if missing:
            raise ExportError(f"{index} names {missing[0]!r}, which is not in {model_dir}")
        return [os.path.join(model_dir, n) for n in files]
    if os.path.isfile(single):
        return [single]
    raise ExportError(f"{model_dir} has no model.safetensors or model.safetensors.index.json; "
                      f"only safetensors checkpoints can be exported (convert .bin weights first)")


def _torch_dtype(config, tensors: list[_TensorInfo]):
    import torch
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    dtype = getattr(text, "dtype", None) or getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    # No dtype in config.json: the dtype most of the weight bytes are stored in.
    by_bytes: dict[str, int] = {}
    for t in tensors:
        if t.dtype in ("F16", "BF16", "F32", "F64"):
            by_bytes[t.dtype] = by_bytes.get(t.dtype, 0) + t.nbytes
    name = max(by_bytes, key=by_bytes.get) if by_bytes else "F32"
    return {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
            "F64": torch.float64}[name]


def read_source_model(model_dir: str | os.PathLike, *, trust_remote_code: bool = False) -> SourceModel:
    """Config, tensor headers, tied weights and KV layout of a HF model directory.

    The model is built on the ``meta`` device (no memory for weights) and run on two
    tokens through amct_hf's calibration hooks (:func:`amct_hf.cache.kv_layout`), so the
    record keys and channel counts are exactly the ones calibration produces.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..modeling.layout import kv_layout

    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        raise ExportError(f"model directory {model_dir!r} does not exist")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ExportError(f"{model_dir} has no config.json; expected a Hugging Face model directory")
    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True,
                                            trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises many types for a bad config
        raise ExportError(f"cannot read {model_dir}/config.json: {e}") from None

    tensors: list[_TensorInfo] = []
    seen: dict[str, str] = {}
    for path in _source_files(model_dir):
        for name, meta in _read_header(path).items():
            if name in seen:
                raise ExportError(f"tensor {name!r} is in both {seen[name]} and {path}")
            seen[name] = path
            dtype, shape = meta["dtype"], list(meta["shape"])
            if dtype not in _DTYPE_BYTES:
                raise ExportError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
            start, end = meta["data_offsets"]
            tensors.append(_TensorInfo(name, dtype, shape, end - start, path, name))

    try:
        with torch.device("meta"):
            meta_model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ExportError(f"cannot build the model of {model_dir} from its config: {e}") from None
    # Tied weights the files do not hold (msModelSlim writes them out; so do we).
    tied = getattr(meta_model, "all_tied_weights_keys", None) or {}
    by_name = {t.name: t for t in tensors}
    for target, source in tied.items():
        if target not in by_name and source in by_name:
            src = by_name[source]
            tensors.append(_TensorInfo(target, src.dtype, src.shape, src.nbytes,
                                       src.source_file, src.source_name))
    layout = kv_layout(meta_model)
    return SourceModel(model_dir, config, _torch_dtype(config, tensors), tensors, layout, meta_model)


def read_tensor(source: SourceModel, name: str):
    """One tensor of the source checkpoint, as stored (memory-mapped file, one tensor read)."""
    from safetensors import safe_open

    info = next((t for t in source.tensors if t.name == name), None)
    if info is None:
        raise ExportError(f"{source.model_dir} has no tensor {name!r}")
    with safe_open(info.source_file, framework="pt", device="cpu") as f:
        return f.get_tensor(info.source_name)


def check_out_dir(out_dir: str | os.PathLike, model_dir: str | os.PathLike, overwrite: bool) -> str:
    """Refuse an existing non-empty ``out_dir`` (unless ``overwrite``) and any ``out_dir``
    that is, or contains, the model directory (overwriting it would delete the source)."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    src = os.path.realpath(os.fspath(model_dir))
    real_out = os.path.realpath(out_dir)
    if real_out == src or src.startswith(real_out.rstrip(os.sep) + os.sep):
        raise ExportError(f"output {out_dir} is (or contains) the model directory; choose another --out")
    if os.path.lexists(out_dir):
        if not os.path.isdir(out_dir):
            raise ExportError(f"output {out_dir} exists and is not a directory")
        if os.listdir(out_dir) and not overwrite:
            raise ExportError(f"output directory {out_dir} exists and is not empty; "
                              f"pass --overwrite (overwrite=True) to replace it")
    return out_dir


def _plan_shards(tensors: list[_TensorInfo], cap: int) -> list[list[_TensorInfo]]:
    shards: list[list[_TensorInfo]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > cap:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _write_shard(path: str, infos: list[_TensorInfo], added: Mapping[str, object]) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = {}
    by_file: dict[str, list[_TensorInfo]] = {}
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
        infos.append(_TensorInfo(name, "", list(tensor.shape),
                                 tensor.numel() * tensor.element_size(), "", name))
    shards = _plan_shards(infos, cap)
    n = len(shards)
    shard_names = [f"{weights_prefix}-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]

    parent = os.path.dirname(out_dir) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{secrets.token_hex(4)}")
    os.mkdir(tmp)
    try:
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
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out_dir": out_dir, "files": sorted(os.listdir(out_dir)), "weight_map": weight_map,
            "total_size": total}


def _replace_dir(tmp: str, out_dir: str) -> None:
    """Rename the finished ``tmp`` to ``out_dir``; an existing one (empty, or allowed to be
    overwritten) is moved aside first and deleted only once the new one is in place."""
    parent = os.path.dirname(out_dir) or "."
    old = None
    if os.path.lexists(out_dir):
        old = os.path.join(parent, f".{os.path.basename(out_dir)}.old-{secrets.token_hex(4)}")
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
