"""Refusals that must come before the first forward pass, not after a calibration of
minutes or hours: whatever the record write or a following export would refuse, and can
be known from the files and the model's config alone, is checked here.

* :func:`check_calibrate_export`: ``calibrate --export-ascend-c8 OUT`` -- OUT (not
  empty, the model folder itself or inside it, not writable), the model folder
  (safetensors checkpoint, KV geometry) and the record's other entries, which the export
  of the merged record would refuse.

The record file itself (regular file, writable, its directory writable, parsable) is
checked by :func:`amct_hf.record.files.check_record_file`, and its entries that the write
cannot edit by :func:`amct_hf.modeling.layout.check_record_editable`.
"""
from __future__ import annotations

import os

from ..errors import ExportError, RecordMismatchError
from ..fileio import writable_dir_problem

__all__ = ["check_calibrate_export"]


def check_calibrate_export(record_file, out_dir, model_dir, *, trust_remote_code: bool = False) -> None:
    """Everything ``calibrate --export-ascend-c8 OUT`` would refuse after calibrating,
    refused now (one line): OUT, the model folder, and record entries other than the
    model's (the merged record would not match the model)."""
    from ..record.files import read_kv_factors
    from .checks import check_kv_geometry
    from .model_dir import check_out_dir
    from .source_model import read_source_model

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
