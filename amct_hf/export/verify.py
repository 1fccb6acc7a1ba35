"""``amct-hf verify``: an export read the way its engine reads it, before an engine does.

Engines find a broken KV export only at run time, if at all (vLLM logs "Using KV cache
scaling factor 1.0" and serves on; vllm-ascend leaves a missing C8 scale at its
initial value). This re-implements their checks on the files alone, without loading
weights: the file set, tensor names, shapes and dtypes, the description / quantization
config keys, offsets zero where the engine ignores them, scales finite and positive, not
1.0 everywhere (the engines' placeholder), and every attention layer covered.

Formats are recognised by the file the engine looks for: ``quant_model_description.json``
(ascend-c8), ``hf_quant_config.json`` (modelopt-fp8), a compressed-tensors
``kv_cache_scheme`` in config.json (vllm-fp8), or a text file (lmdeploy-ascend record).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

from ..errors import ExportError, MissingFileError

__all__ = ["VerifyReport", "verify_export"]

_ATTN = re.compile(r"^(.*\.(?:self_attn|attention|attn))\.(?:k_proj|qkv_proj|W_pack|query_key_value)\.weight$")
_LMDEPLOY_PAIR = re.compile(r"scale:\s*([\d\.\-]+)\s*offset:\s*(-?\d+)")
_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


@dataclass
class VerifyReport:
    """Per-layer rows, the problems found (first one is the verdict's reason), the format."""
    path: str
    format: str
    rows: list = field(default_factory=list)      # (layer, K scales, V scales, shape, dtype, note)
    problems: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def verdict(self) -> str:
        if self.ok:
            return f"OK: {self.format} export {self.path}: {len(self.rows)} attention layers, every check passed"
        more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        return f"FAIL: {self.format} export {self.path}: {self.problems[0]}{more}"

    def table(self) -> str:
        head = ("layer", "K scale min..max", "V scale min..max", "shape", "dtype", "")
        rows = [head, *self.rows]
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _json(path: str, problems: list) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        return doc
    except (OSError, ValueError) as e:
        problems.append(f"{os.path.basename(path)} is unreadable ({e})")
        return {}


def _headers(export_dir: str, index_name: str, problems: list) -> dict:
    """name -> (dtype string, shape, shard path), through the index as loaders read it."""
    from safetensors import safe_open

    index_path = os.path.join(export_dir, index_name)
    if not os.path.isfile(index_path):
        problems.append(f"no {index_name}")
        return {}
    weight_map = _json(index_path, problems).get("weight_map") or {}
    out = {}
    for shard in sorted(set(weight_map.values())):
        path = os.path.join(export_dir, shard)
        if not os.path.isfile(path):
            problems.append(f"{index_name} names the shard {shard!r}, which is missing")
            continue
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                out[name] = (sl.get_dtype(), list(sl.get_shape()), path)
    missing = [n for n in weight_map if n not in out]
    if missing and not problems:
        problems.append(f"{index_name} maps {missing[0]!r} to a shard that does not hold it")
    return out


def _values(headers: dict, name: str):
    from safetensors import safe_open
    with safe_open(headers[name][2], framework="pt") as f:
        return f.get_tensor(name).float().reshape(-1).tolist()


def _scale_problem(name: str, values: list) -> str | None:
    bad = next((v for v in values if not math.isfinite(v) or v <= 0), None)
    if bad is not None:
        return f"{name} has the scale {bad}; scales must be finite and positive"
    return None


def _kv_heads(config: dict) -> tuple[int, int]:
    text = config.get("text_config") or config
    heads = text.get("num_attention_heads")
    kv = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or (text.get("hidden_size", 0) // heads if heads else 0)
    return kv, head_dim


def _layers(config: dict) -> int | None:
    return (config.get("text_config") or config).get("num_hidden_layers")


def _fmt(values: list) -> str:
    return f"{min(values):.4g}..{max(values):.4g}" if values else "-"


def _check_dir(report: VerifyReport, export_dir: str, index_name: str, kv_names, expected_shapes,
               expected_dtype: str, offsets=None) -> None:
    """Shared per-layer checks. ``kv_names(attn)`` -> (key scale, value scale) tensor names;
    ``offsets(attn)`` -> offset tensor names that must hold zeros."""
    problems = report.problems
    config = _json(os.path.join(export_dir, "config.json"), problems)
    headers = _headers(export_dir, index_name, problems)
    attns = sorted({m.group(1) for n in headers if (m := _ATTN.match(n))},
                   key=lambda a: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", a)])
    layers = _layers(config)
    if layers is not None and len(attns) != layers:
        problems.append(f"config.json has {layers} layers but the weights have {len(attns)} attention modules")
    all_scales = []
    for attn in attns:
        cols = []
        shape_seen, dtype_seen, note = "", "", ""
        for name in kv_names(attn):
            if name not in headers:
                problems.append(f"layer {attn!r} has no {name[len(attn) + 1:]} tensor; the engine "
                                f"would run it with its default scale")
                cols.append("missing")
                note = "MISSING"
                continue
            dtype, shape, _ = headers[name]
            shape_seen, dtype_seen = str(shape), dtype
            if shape not in expected_shapes(config):
                problems.append(f"{name} has shape {shape}; the engine creates "
                                f"{' or '.join(str(s) for s in expected_shapes(config))}")
                note = "SHAPE"
            if dtype != expected_dtype:
                problems.append(f"{name} is {dtype}; the engine expects {expected_dtype}")
                note = "DTYPE"
            values = _values(headers, name)
            problem = _scale_problem(name, values)
            if problem:
                problems.append(problem)
                note = "SCALE"
            all_scales += values
            cols.append(_fmt(values))
        for name in (offsets(attn) if offsets else ()):
            if name not in headers:
                problems.append(f"layer {attn!r} has no offset tensor {name}")
                note = "MISSING"
                continue
            bad = next((v for v in _values(headers, name) if v != 0), None)
            if bad is not None:
                problems.append(f"{name} holds the offset {bad:g}; the engine dequantizes with the scale alone "
                                f"and ignores offsets, so only zeros are served as calibrated")
                note = "OFFSET"
        report.rows.append((attn, *cols, shape_seen, dtype_seen, note))
    if not attns:
        problems.append("no attention module found among the weights (no <attn>.k_proj.weight)")
    elif all_scales and all(v == 1.0 for v in all_scales):
        problems.append("every KV scale is 1.0, the engines' uncalibrated placeholder")


def _verify_ascend(report: VerifyReport, d: str) -> None:
    description = _json(os.path.join(d, "quant_model_description.json"), report.problems)
    for key, want in (("kv_cache_type", "C8"), ("kv_quant_type", "C8")):
        if description and description.get(key) != want:
            report.problems.append(f"quant_model_description.json has {key}={description.get(key)!r}; "
                                   f"vllm-ascend enables C8 only with {want!r}")
    config = _json(os.path.join(d, "config.json"), [])
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    kv, head_dim = _kv_heads(config)
    _check_dir(report, d, "quant_model_weights.safetensors.index.json",
               lambda a: (f"{a}.k_proj.kv_cache_scale", f"{a}.v_proj.kv_cache_scale"),
               lambda c: [[kv * head_dim]], _DTYPES.get(dtype, dtype),
               offsets=lambda a: (f"{a}.k_proj.kv_cache_offset", f"{a}.v_proj.kv_cache_offset"))
    if description:
        headers = _headers(d, "quant_model_weights.safetensors.index.json", [])
        undescribed = next((n for n in headers if n not in description), None)
        if undescribed:
            report.problems.append(f"quant_model_description.json does not describe {undescribed!r}; "
                                   f"vllm-ascend looks every tensor up")


def _verify_vllm(report: VerifyReport, d: str) -> None:
    config = _json(os.path.join(d, "config.json"), report.problems)
    scheme = (config.get("quantization_config") or {}).get("kv_cache_scheme") or {}
    want = {"type": "float", "num_bits": 8, "symmetric": True}
    for key, value in want.items():
        if scheme.get(key) != value:
            report.problems.append(f"kv_cache_scheme {key}={scheme.get(key)!r}; vLLM's FP8 KV cache needs {value!r}")
    strategy = scheme.get("strategy")
    if strategy not in ("tensor", "attn_head"):
        report.problems.append(f"kv_cache_scheme strategy={strategy!r}; vLLM accepts 'tensor' or 'attn_head'")
    kv, _ = _kv_heads(config)
    shapes = (lambda c: [[kv]]) if strategy == "attn_head" else (lambda c: [[1], []])
    _check_dir(report, d, "model.safetensors.index.json", lambda a: (f"{a}.k_scale", f"{a}.v_scale"),
               shapes, "F32")


def _verify_modelopt(report: VerifyReport, d: str) -> None:
    hf_quant = _json(os.path.join(d, "hf_quant_config.json"), report.problems)
    algo = (hf_quant.get("quantization") or {}).get("kv_cache_quant_algo")
    if hf_quant and algo != "FP8":
        report.problems.append(f"hf_quant_config.json kv_cache_quant_algo={algo!r}; expected 'FP8'")
    config = _json(os.path.join(d, "config.json"), [])
    if (config.get("quantization_config") or {}).get("quant_method") != "modelopt":
        report.problems.append("config.json has no quantization_config with quant_method 'modelopt'")
    _check_dir(report, d, "model.safetensors.index.json",
               lambda a: (f"{a}.k_proj.k_scale", f"{a}.v_proj.v_scale"), lambda c: [[], [1]], "F32")


def _verify_lmdeploy(report: VerifyReport, path: str, layers: int | None) -> None:
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    pairs = [(float(s), int(o)) for s, o in _LMDEPLOY_PAIR.findall(text)]
    entries = text.count("kv_cache_value")
    if entries != len(pairs):
        report.problems.append(f"{entries} entries but lmdeploy's pattern reads {len(pairs)} scale/offset pairs "
                               f"(exponent notation or per-channel entries drop out or mis-pair)")
    if layers is not None and len(pairs) not in (layers, 2 * layers):
        report.problems.append(f"{len(pairs)} pairs for a {layers}-layer model; lmdeploy needs "
                               f"{layers} or {2 * layers}")
    elif layers is None and len(pairs) % 2:
        report.problems.append(f"{len(pairs)} pairs: not a key and a value per layer")
    for i in range(0, len(pairs) - 1, 2):
        (ks, ko), (vs, vo) = pairs[i], pairs[i + 1]
        for kind, s in (("key", ks), ("value", vs)):
            if not math.isfinite(s) or s <= 0:
                report.problems.append(f"layer {i // 2} {kind} has the scale {s}; scales must be finite and positive")
        report.rows.append((f"layer {i // 2}", f"{ks:.4g} (offset {ko})", f"{vs:.4g} (offset {vo})", "[1]",
                            "text", ""))
    if not pairs:
        report.problems.append("no scale/offset pair that lmdeploy's pattern reads")
    elif all(s == 1.0 for s, _ in pairs):
        report.problems.append("every KV scale is 1.0, the engines' uncalibrated placeholder")


def verify_export(path: str | os.PathLike, *, num_layers: int | None = None) -> VerifyReport:
    """Check an export as its engine would read it (module doc); never raises for a
    problem of the export itself (they are in ``report.problems``), only for a path that
    does not exist or is no export at all. ``num_layers``: for an lmdeploy record, the
    model's decoder layers."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MissingFileError(f"{path!r} does not exist")
    if os.path.isfile(path):
        report = VerifyReport(path, "lmdeploy-ascend")
        _verify_lmdeploy(report, path, num_layers)
        return report
    if os.path.isfile(os.path.join(path, "quant_model_description.json")):
        report = VerifyReport(path, "ascend-c8")
        _verify_ascend(report, path)
    elif os.path.isfile(os.path.join(path, "hf_quant_config.json")):
        report = VerifyReport(path, "modelopt-fp8")
        _verify_modelopt(report, path)
    elif os.path.isfile(os.path.join(path, "config.json")) and \
            (_json(os.path.join(path, "config.json"), []).get("quantization_config") or {}).get("kv_cache_scheme"):
        report = VerifyReport(path, "vllm-fp8")
        _verify_vllm(report, path)
    else:
        raise ExportError(f"{path} is none of the engine exports (no quant_model_description.json, no "
                          f"hf_quant_config.json, no kv_cache_scheme in config.json)")
    return report
