"""Refusals that must come before the first forward pass, not after a calibration of
minutes or hours: whatever the record write or a following export would refuse, and can
be known from the files and the model's config alone, is checked here.

* :func:`check_record_editable`: the record's entries that the write would have to edit
  but cannot (the list form ``record: [...]``) holding one of the model's keys;
* :func:`check_calibrate_export`: ``calibrate --export-ascend-c8 OUT`` -- OUT (not
  empty, the model folder itself or inside it, not writable), the model folder
  (safetensors checkpoint, KV geometry) and the record's other entries, which the export
  of the merged record would refuse.

The record file itself (regular file, writable, its directory writable, parsable) is
checked by :func:`amct_hf.record.files.check_record_file`.
"""
from __future__ import annotations

import os

from .errors import ExportError, RecordFileError, RecordMismatchError
from .fileio import writable_dir_problem
from .record.files import uneditable_keys

__all__ = ["check_record_editable", "check_calibrate_export"]


def _model_keys(model) -> set[str]:
    """Every record key the model's modules can give (a superset: ``k_proj`` / ``v_proj``
    modules, and the fused-attention names of every module)."""
    from .naming import layer_kind

    names = [name for name, _ in model.named_modules() if name]
    keys = {n for n in names if layer_kind(n) is not None}
    keys.update(f"{n}.{suffix}" for n in names for suffix in ("key_states", "value_states"))
    return keys


def check_record_editable(record_file, model) -> None:
    """Refuse (RecordFileError, one line) a record holding one of ``model``'s keys in an
    entry the write cannot edit, before anything is calibrated."""
    if not os.path.isfile(record_file):
        return
    blocked = uneditable_keys(record_file)
    if not blocked:
        return
    keys = _model_keys(model)
    hit = next((k for k in blocked if k in keys), None)
    if hit is not None:
        raise RecordFileError(
            f"record {os.fspath(record_file)}: the entry for layer {hit!r} {blocked[hit]}, which the "
            f"write after calibrating cannot edit without loss; rewrite that entry as 'record {{ ... }}' "
            f"or use another --record")


def check_calibrate_export(record_file, out_dir, model_dir, *, trust_remote_code: bool = False) -> None:
    """Everything ``calibrate --export-ascend-c8 OUT`` would refuse after calibrating,
    refused now (one line): OUT, the model folder, and record entries other than the
    model's (the merged record would not match the model)."""
    from .export.checks import check_kv_geometry
    from .export.model_dir import check_out_dir
    from .export.source_model import read_source_model
    from .record.files import read_kv_factors

    if model_dir is None or not os.path.isdir(model_dir):
        raise ExportError(f"--export-ascend-c8 needs --model to be a local model folder, got {model_dir!r}")
    out_dir = check_out_dir(out_dir, model_dir, overwrite=False)
    problem = writable_dir_problem(out_dir)
    if problem:
        raise ExportError(f"--export-ascend-c8 {out_dir}: {problem}")
    source = read_source_model(model_dir, trust_remote_code=trust_remote_code)
    check_kv_geometry(source)
    existing = read_kv_factors(record_file) if os.path.isfile(record_file) else {}
    other = [name for name in existing if name not in source.kv_layout]
    if other:
        raise RecordMismatchError(
            f"record {os.fspath(record_file)} already holds {other[0]!r} ({len(other)} entr"
            f"{'ies' if len(other) != 1 else 'y'} the model {model_dir} does not have); calibrating "
            f"merges into it, and the export needs a record of this model only: pass another --record")
