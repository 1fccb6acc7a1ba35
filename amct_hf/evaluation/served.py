"""An export directory read the way its engine reads it, and the K/V arithmetic the
engine applies with what it read (for :func:`amct_hf.evaluation.perplexity.evaluate_kv_quant`
with ``export_dir``).

* ``ascend-c8`` (``quant_model_description.json`` with ``kv_cache_type`` C8): the exported
  weights (value offsets folded into the attention biases included), and per attention
  module ``k_proj.kv_cache_scale`` / ``v_proj.kv_cache_scale`` of ``[kv_heads * head_dim]``
  cast to the dtype the model runs in (vllm-ascend casts them to its default dtype, so a
  bf16 model's scales carry bf16 rounding), used scale-only:
  ``q = clamp(round(x / s), -128, 127)``, ``x_hat = q * s``.
* ``vllm-fp8`` (config.json ``quantization_config`` compressed-tensors with a
  ``kv_cache_scheme``) and ``modelopt-fp8`` (``hf_quant_config.json`` with
  ``kv_cache_quant_algo`` FP8): ``<attn>.k_scale`` / ``.v_scale`` (or ModelOpt's
  ``k_proj.k_scale`` / ``v_proj.v_scale``), float32, one per tensor or one per KV head;
  vLLM stores ``fp8_e4m3(x / scale)`` with saturation to +-448 and reads back
  ``fp8 * scale``.

The references beside them: E4M3 with scale 1.0 (vLLM's and ModelOpt's uncalibrated
default) and dynamic per-token INT8 (in :mod:`amct_hf.evaluation.perplexity`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from ..errors import ExportError, MissingFileError
from ..naming import attention_path, layer_kind

__all__ = ["ServedExport", "read_served_export", "load_export_model", "int8_scale_only", "fp8_e4m3",
           "FP8_E4M3_MAX"]

FP8_E4M3_MAX = 448.0
_ASCEND_DESCRIPTION = "quant_model_description.json"
_MODELOPT_CONFIG = "hf_quant_config.json"


def int8_scale_only(x: torch.Tensor, scale: torch.Tensor):
    """Symmetric INT8 with the scale alone (float32); returns (x_hat, clipped mask)."""
    raw = torch.round(x / scale)
    return raw.clamp(-128, 127) * scale, (raw < -128) | (raw > 127)


def fp8_e4m3(x: torch.Tensor, scale: torch.Tensor):
    """``float8_e4m3fn(x / scale)`` saturated to +-448, times ``scale``; returns (x_hat,
    saturated mask)."""
    y = x / scale
    hat = y.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float() * scale
    return hat, y.abs() > FP8_E4M3_MAX


@dataclass
class ServedExport:
    """What an engine reads from an export directory."""
    export_dir: str
    format: str                 # "ascend-c8", "vllm-fp8" or "modelopt-fp8"
    scales: dict                # (attention path, "key"/"value") -> float32 tensor as the engine reads it
    granularity: str            # "per_channel", "per_head" or "per_tensor"
    fp8_query: bool = False     # evaluation: the query is quantized to FP8 too

    @property
    def label(self) -> str:
        number = "scale-only INT8" if self.format == "ascend-c8" else "FP8 E4M3"
        return f"as served by {self.format} ({number}, {self.granularity})"

    def scale_for(self, name: str) -> torch.Tensor:
        key = (attention_path(name), layer_kind(name))
        if key not in self.scales:
            raise ExportError(f"{self.export_dir} has no {key[1]} scale for the attention {key[0]!r}; "
                              f"the engine would run that layer with its default")
        return self.scales[key]

    def function(self):
        """``f(record key, x[B, kv_heads, S, head_dim] float32) -> (x_hat, clipped)``."""
        shaped: dict = {}
        quant = int8_scale_only if self.format == "ascend-c8" else fp8_e4m3

        def run(name, x):
            key = (name, x.device)
            if key not in shaped:
                s = self.scale_for(name).to(x.device)
                heads, dim = x.shape[1], x.shape[-1]
                if s.numel() == heads * dim:
                    s = s.view(heads, 1, dim)
                elif s.numel() == heads:
                    s = s.view(heads, 1, 1)
                elif s.numel() != 1:
                    raise ExportError(f"{self.export_dir}: the scale of {name!r} has {s.numel()} "
                                      f"elements; {heads} KV heads x {dim} need 1, {heads} or {heads * dim}")
                shaped[key] = s
            return quant(x, shaped[key])
        return run

    def query_function(self):
        """``f(attention path, q[B, heads, S, head_dim]) -> q_hat``: the query in FP8 E4M3
        with the export's ``q_scale`` (1.0 without one), as vLLM's FlashAttention 3,
        Triton and FlashInfer backends quantize it with an FP8 KV cache (one scale per
        layer: vLLM's backends take the max of per-head query scales)."""
        if self.format == "ascend-c8":
            raise ExportError("vllm-ascend's C8 cache leaves the query unquantized")

        def run(path, q):
            s = self.scales.get((path, "query"))
            s = torch.ones((), device=q.device) if s is None else s.max().to(q.device)
            return fp8_e4m3(q.float(), s)[0].to(q.dtype)
        return run


def _json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read {path}: {e}") from None


def export_kind(export_dir: str) -> str:
    """Which engine format a directory is, from the files its engine looks for."""
    if not os.path.isdir(export_dir):
        raise MissingFileError(f"export directory {export_dir!r} does not exist")
    if os.path.isfile(os.path.join(export_dir, _ASCEND_DESCRIPTION)):
        return "ascend-c8"
    if os.path.isfile(os.path.join(export_dir, _MODELOPT_CONFIG)):
        return "modelopt-fp8"
    config_path = os.path.join(export_dir, "config.json")
    if os.path.isfile(config_path):
        qc = _json(config_path).get("quantization_config") or {}
        if qc.get("quant_method") == "compressed-tensors" and qc.get("kv_cache_scheme"):
            return "vllm-fp8"
    raise ExportError(f"{export_dir} is none of the engine exports (no {_ASCEND_DESCRIPTION}, no "
                      f"{_MODELOPT_CONFIG}, no compressed-tensors kv_cache_scheme in config.json)")


def export_tensors(export_dir: str) -> dict:
    """Every tensor of the directory, through its safetensors index (as loaders read it)."""
    from safetensors.torch import load_file

    index = [n for n in sorted(os.listdir(export_dir)) if n.endswith(".safetensors.index.json")]
    if len(index) != 1:
        raise ExportError(f"{export_dir} has {len(index)} safetensors index files; expected one")
    weight_map = _json(os.path.join(export_dir, index[0])).get("weight_map") or {}
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        path = os.path.join(export_dir, shard)
        if not os.path.isfile(path):
            raise ExportError(f"{index[0]} names the shard {shard!r}, which is not in {export_dir}")
        tensors.update(load_file(path))
    return tensors


_SUFFIXES = {
    "ascend-c8": {".k_proj.kv_cache_scale": "key", ".v_proj.kv_cache_scale": "value"},
    "vllm-fp8": {".k_scale": "key", ".v_scale": "value", ".q_scale": "query"},
    "modelopt-fp8": {".k_proj.k_scale": "key", ".v_proj.v_scale": "value"},
}
_IGNORED = {"ascend-c8": (".kv_cache_offset",), "vllm-fp8": (), "modelopt-fp8": ()}


def split_tensors(fmt: str, tensors: dict) -> tuple[dict, dict]:
    """(model weights, {(attention, kind): KV scale tensor}) of an export's tensors."""
    weights, scales = {}, {}
    for name, t in tensors.items():
        for suffix, kind in _SUFFIXES[fmt].items():
            if name.endswith(suffix):
                scales[(name[: -len(suffix)], kind)] = t
                break
        else:
            if not name.endswith(_IGNORED[fmt]):
                weights[name] = t
    return weights, scales


def read_served_export(export_dir: str | os.PathLike, run_dtype: torch.dtype, tensors: dict | None = None
                       ) -> ServedExport:
    """The KV scales of an export as its engine holds them for a model run in ``run_dtype``."""
    export_dir = os.fspath(export_dir)
    fmt = export_kind(export_dir)
    _, raw = split_tensors(fmt, tensors if tensors is not None else export_tensors(export_dir))
    if not raw:
        raise ExportError(f"{export_dir} ({fmt}) holds no KV scale tensors")
    scales = {}
    for key, t in raw.items():
        # vllm-ascend casts its C8 scales to the default dtype; vLLM keeps float32
        t = t.to(run_dtype) if fmt == "ascend-c8" else t.to(torch.float32)
        scales[key] = t.float().reshape(-1)
    sizes = {t.numel() for (_, kind), t in scales.items() if kind != "query"}
    if fmt == "ascend-c8":
        granularity = "per_channel"
    else:
        granularity = "per_tensor" if sizes == {1} else "per_head"
    return ServedExport(export_dir, fmt, scales, granularity)


def load_export_model(export_dir: str | os.PathLike, dtype=None, trust_remote_code: bool = False):
    """The model of an export directory, built from its config.json (the quantization
    config left out: the weights are unquantized) with the weights of its shards; returns
    (model, tensors)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    export_dir = os.fspath(export_dir)
    fmt = export_kind(export_dir)
    config = AutoConfig.from_pretrained(export_dir, local_files_only=True, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    tensors = export_tensors(export_dir)
    weights, _ = split_tensors(fmt, tensors)
    if dtype is None or dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        what = f"no tensor {missing[0]!r}" if missing else f"an unknown tensor {unexpected[0]!r}"
        raise ExportError(f"{export_dir}: the model built from its config.json has {what}")
    model.tie_weights()
    return model.eval(), tensors
