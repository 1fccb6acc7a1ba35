"""Loading a model and its tokenizer, and the few facts about a loaded model the
calibration and evaluation loops need."""
from __future__ import annotations

import inspect
import os

import torch
from torch import nn

from ..errors import InvalidArgumentError, MissingFileError, ModelLoadError

__all__ = ["looks_like_path", "load_model", "load_tokenizer", "input_device", "no_logits_kwargs", "resolve_dtype",
           "text_config"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def looks_like_path(name: str) -> bool:
    """Whether a name was meant as a local path rather than a hub id (``name`` or
    ``owner/name``): absolute, starting with ``.`` or ``~``, ending in ``/``, holding a
    backslash, or with more than one ``/``. A typo in such a name then fails at once as
    a missing path instead of after minutes of hub retries."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.endswith("/")
            or "\\" in name or name.count("/") > 1)


def resolve_dtype(dtype):
    """None, ``"auto"``, a torch dtype or its name (float32, bfloat16, float16)."""
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise InvalidArgumentError(
        f"dtype={dtype!r} is not supported; use float32, bfloat16, float16 or auto")


def load_tokenizer(tok, trust_remote_code: bool = False):
    if isinstance(tok, (str, os.PathLike)):
        from transformers import AutoTokenizer
        try:
            tok = AutoTokenizer.from_pretrained(os.fspath(tok), trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"cannot load model {os.fspath(tok)!r} (its tokenizer): "
                                 f"{' '.join(str(err).split())}") from err
    if getattr(tok, "pad_token_id", None) is None and getattr(tok, "eos_token_id", None) is not None:
        tok.pad_token = tok.eos_token  # padding is masked out of the statistics anyway
    return tok


def load_model(model, *, device_map=None, dtype=None, trust_remote_code=False, tokenizer=None,
               max_memory=None, offload_folder=None):
    """(model in eval mode, tokenizer) from an id/path or an already loaded model.

    A name that looks like a local path and does not exist fails at once, without
    asking the hub; a folder whose weights cannot be read fails with one line naming it.
    ``max_memory`` and ``offload_folder`` go to ``from_pretrained`` (see
    :func:`amct_hf.modeling.placement.offload_kwargs`: without a ``device_map`` they imply
    ``device_map="auto"``)."""
    from transformers import AutoModelForCausalLM

    from .placement import offload_kwargs
    if isinstance(model, nn.Module):
        if max_memory is not None or offload_folder is not None:
            raise InvalidArgumentError(
                "max_memory/offload_folder place a model while loading it; this model is already "
                "loaded (pass its path, or load it with them yourself)")
        if tokenizer is None:
            raise InvalidArgumentError("a loaded model needs its tokenizer: pass tokenizer=...")
        return model, load_tokenizer(tokenizer, trust_remote_code)
    if not isinstance(model, (str, os.PathLike)):
        raise InvalidArgumentError(
            f"model must be a model id, a local path or a loaded model, got {type(model).__name__}")
    path = os.path.expanduser(os.fspath(model))
    if (looks_like_path(path) or os.path.exists(path)) and not os.path.isdir(path):
        raise MissingFileError(f"model folder {path!r} does not exist"
                               if not os.path.exists(path) else f"model path {path!r} is not a folder")
    kwargs = {"trust_remote_code": trust_remote_code,
              **offload_kwargs(device_map, max_memory, offload_folder)}
    dtype = resolve_dtype(dtype)
    if dtype is not None:
        kwargs["dtype"] = dtype
    tok = load_tokenizer(tokenizer if tokenizer is not None else path, trust_remote_code)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as err:  # noqa: BLE001 - loader errors (OSError, SafetensorError, UnpicklingError...)
        if isinstance(err, (MemoryError, KeyboardInterrupt)):
            raise
        what = "not a local model folder, and it could not be fetched (offline?)" \
            if not os.path.isdir(path) else f"{type(err).__name__}"
        raise ModelLoadError(f"cannot load model {path!r}: {what}: {' '.join(str(err).split())}") from err
    return loaded.eval(), tok


def input_device(model: nn.Module) -> torch.device:
    """Device of the first materialised parameter: where inputs go (device_map models too)."""
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def no_logits_kwargs(model: nn.Module) -> dict:
    """Forward kwargs that spare the LM head: calibration reads K/V only, and logits over
    every position of a large vocabulary can cost a fifth of a small model's forward pass."""
    try:
        accepted = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}


def text_config(model: nn.Module):
    """The decoder's config (multimodal configs nest it), or None."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config(decoder=True)
    return config
