"""The one table of export formats: what each writes, what it needs, and how to call it.

The command line looks a format up here (:func:`export_format`) instead of branching on
its name, so a new format is one row.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import InvalidArgumentError

__all__ = ["ExportFormat", "FORMATS", "export_format"]


def _entries(n: int) -> str:
    return f"{n} K/V entr{'ies' if n != 1 else 'y'}"


def _json(record, out, model, options):
    from .factors import export_json
    return f"wrote {_entries(len(export_json(record, out)['layers']))} (json) to {out}"


def _safetensors(record, out, model, options):
    from .factors import export_safetensors
    return f"wrote {_entries(len(export_safetensors(record, out)) // 2)} (safetensors) to {out}"


def _lmdeploy(record, out, model, options):
    from .lmdeploy import export_lmdeploy_ascend
    export_lmdeploy_ascend(record, out)
    return (f"wrote the lmdeploy Ascend record (per-tensor, k then v per layer, offsets negated to "
            f"dlinfer's round(x/s - o)) to {out}")


def _model_dir(function_name: str, name: str):
    def run(record, out, model, options):
        from . import ascend, modelopt, vllm
        export = {"export_ascend_c8": ascend.export_ascend_c8,
                  "export_vllm_fp8": vllm.export_vllm_fp8,
                  "export_modelopt_fp8": modelopt.export_modelopt_fp8}[function_name]
        written = export(record, model, out, **options)
        lines = [f"wrote {name} model directory {written['out_dir']} ({len(written['files'])} files, "
                 f"{written['total_size'] / 1e6:.0f} MB of weights)"]
        if written.get("folded_value_offsets"):
            lines.append("value offsets folded into the attention biases (v_proj/o_proj; config.json "
                         "attention_bias: true): the engine's scale-only C8 cache serves the asymmetric values")
        return "\n".join(lines)
    return run


@dataclass(frozen=True)
class ExportFormat:
    """One export format: ``writes`` says what comes out; ``needs_model`` whether the
    source model directory is read (the output is then a directory); ``suffix`` names the
    default output beside the record for file formats."""

    name: str
    writes: str
    engines: str
    needs_model: bool
    suffix: str | None
    run: Callable[[str, str, str | None, dict], str]

    def default_out(self, record_file: str | os.PathLike) -> str | None:
        if self.suffix is None:
            return None
        return os.path.splitext(os.fspath(record_file))[0] + self.suffix

    def export(self, record_file, out, *, model=None, **options) -> str:
        """Write the export; returns a one-paragraph summary of what was written."""
        if self.needs_model and (model is None or out is None):
            raise InvalidArgumentError(
                f"--format {self.name} writes a model directory: pass --model MODEL_DIR (the model the "
                "record was calibrated on) and --out OUT_DIR")
        out = out if out is not None else self.default_out(record_file)
        return self.run(os.fspath(record_file), os.fspath(out), model, options if self.needs_model else {})


FORMATS: dict[str, ExportFormat] = {f.name: f for f in (
    ExportFormat("json", "factor file", "any (our own layout)", False, ".json", _json),
    ExportFormat("safetensors", "factor file", "any (our own layout)", False, ".safetensors", _safetensors),
    ExportFormat("ascend-c8", "model directory", "vllm-ascend, MindIE", True, None,
                 _model_dir("export_ascend_c8", "ascend-c8")),
    ExportFormat("vllm-fp8", "model directory", "vLLM (compressed-tensors FP8 KV scales)", True, None,
                 _model_dir("export_vllm_fp8", "vllm-fp8")),
    ExportFormat("modelopt-fp8", "model directory", "TensorRT-LLM, SGLang (ModelOpt unified HF, FP8 KV)",
                 True, None, _model_dir("export_modelopt_fp8", "modelopt-fp8")),
    ExportFormat("lmdeploy-ascend", "engine record", "lmdeploy (dlinfer, Ascend)", False, ".lmdeploy.txt",
                 _lmdeploy),
)}


def export_format(name: str) -> ExportFormat:
    if name not in FORMATS:
        raise InvalidArgumentError(f"unknown export format {name!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[name]
