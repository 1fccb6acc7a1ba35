"""The AMCT protobuf text record: its schema, an exact scanner, a lossless merge, and
reading the factors back for use.

Everything here knows the file format and nothing of the algorithms that produce the
factors.
"""
from .files import check_record_file, load_kv_factors, read_kv_factors, write_kv_factors
from .merge import parse_record_text
from .schema import ScaleOffsetRecord, format_record, to_float32

__all__ = ["ScaleOffsetRecord", "check_record_file", "format_record", "load_kv_factors",
           "parse_record_text", "read_kv_factors", "to_float32", "write_kv_factors"]
