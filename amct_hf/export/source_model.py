"""What an export needs to know about a Hugging Face model directory, read without
loading its weights: config, the safetensors headers (names, dtypes, shapes), tied
weights the files do not hold, the dtype the engines run it in, and the KV layout the
calibration hooks produce (found on a ``meta``-device copy of the model).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from ..errors import ExportError

__all__ = ["SourceModel", "TensorInfo", "read_source_model", "read_tensor"]

# safetensors header dtype -> bytes per element
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
                "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
                "I64": 8, "U64": 8, "F64": 8}

@dataclass
class TensorInfo:
    """One tensor of the output, and where its bytes come from."""


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
    tensors: list[TensorInfo]        # in file order, tied weights appended
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


def _torch_dtype(config, tensors: list[TensorInfo]):
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
    tokens through amct_hf's calibration hooks (:func:`amct_hf.modeling.layout.kv_layout`), so the
    record keys and channel counts are exactly the ones calibration produces.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..modeling.layout import kv_layout

    model_dir = os.fspath(model_dir)
    if os.path.exists(model_dir) and not os.path.isdir(model_dir):
        raise ExportError(f"model directory {model_dir!r} is a file; pass the folder that holds "
                          f"config.json and the safetensors weights")
    if not os.path.isdir(model_dir):
        raise ExportError(f"model directory {model_dir!r} does not exist")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ExportError(f"{model_dir} has no config.json; expected a Hugging Face model directory")
    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True,
                                            trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises many types for a bad config
        raise ExportError(f"cannot read {model_dir}/config.json: {e}") from None

    tensors: list[TensorInfo] = []
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
            tensors.append(TensorInfo(name, dtype, shape, end - start, path, name))

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
            tensors.append(TensorInfo(target, src.dtype, src.shape, src.nbytes,
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


