"""The one table of export formats: what each writes, what it needs, and how to call it.

The command line looks a format up here (:func:`export_format`) instead of branching on
its name, so a new format is one row.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import AmctHfError, ExportError, InvalidArgumentError

__all__ = ["ExportFormat", "FORMATS", "export_format", "export_io_error"]


def export_io_error(err: OSError, out) -> ExportError:
    """One line for an I/O failure of an export (disk full, read-only filesystem, a
    regular file where a directory is needed): the path and the cause, not a traceback.
    The writers leave nothing behind on failure (temp files and directories removed)."""
    path = err.filename or out
    cause = err.strerror or str(err) or type(err).__name__
    return ExportError(f"cannot write the export {os.fspath(out)}: {path}: {cause}")


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
    num_layers = model_layer_count(model) if model is not None else None
    export_lmdeploy_ascend(record, out, num_layers=num_layers)
    checked = (f"{num_layers} layers, as the model" if num_layers is not None
               else "layer count not checked: pass --model")
    return (f"wrote the lmdeploy Ascend record (per-tensor, k then v per layer; {checked}; offsets "
            f"negated to dlinfer's round(x/s - o)) to {out}")


def model_layer_count(model) -> int:
    """``num_hidden_layers`` of a local model folder's config.json (its text config)."""
    from transformers import AutoConfig

    from ..errors import MissingFileError
    model = os.fspath(model)
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise MissingFileError(f"--model {model} is not a model folder with a config.json")
    try:
        config = AutoConfig.from_pretrained(model, local_files_only=True)
    except Exception as e:  # transformers raises many types for a bad config
        raise ExportError(f"cannot read {model}/config.json: {' '.join(str(e).split())}") from None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None)
    if not isinstance(layers, int) or layers <= 0:
        raise ExportError(f"{model}/config.json has no num_hidden_layers; cannot check the layer count")
    return layers


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
        try:
            return self.run(os.fspath(record_file), os.fspath(out), model, options if self.needs_model else {})
        except OSError as err:
            if isinstance(err, AmctHfError):
                raise
            raise export_io_error(err, out) from err
        except Exception as err:
            if type(err).__name__ != "SafetensorError":  # safetensors' own wrapper of an I/O error
                raise
            raise ExportError(f"cannot write the export {os.fspath(out)}: {' '.join(str(err).split())}") from err


FORMATS: dict[str, ExportFormat] = {f.name: f for f in (
    ExportFormat("json", "factor file", "any reader of our own layout", False, ".json", _json),
    ExportFormat("safetensors", "factor file", "any reader of our own layout", False, ".safetensors", _safetensors),
    ExportFormat("ascend-c8", "model directory", "vllm-ascend, MindIE", True, None,
                 _model_dir("export_ascend_c8", "ascend-c8")),
    ExportFormat("vllm-fp8", "model directory", "vLLM, compressed-tensors FP8 KV scales", True, None,
                 _model_dir("export_vllm_fp8", "vllm-fp8")),
    ExportFormat("modelopt-fp8", "model directory", "TensorRT-LLM and SGLang, ModelOpt unified HF layout",
                 True, None, _model_dir("export_modelopt_fp8", "modelopt-fp8")),
    ExportFormat("lmdeploy-ascend", "engine record", "lmdeploy with dlinfer on Ascend", False, ".lmdeploy.txt",
                 _lmdeploy),
)}


def export_format(name: str) -> ExportFormat:
    if name not in FORMATS:
        raise InvalidArgumentError(f"unknown export format {name!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[name]
