"""Records a hostile tester hands over: refused with one line, the file untouched."""
import pytest

from amct_hf.errors import RecordFileError
from amct_hf.record.files import check_record_file, read_kv_factors, write_kv_factors

ENTRY = ('record {\n  key: "model.layers.0.self_attn.k_proj"\n  kv_cache_value {\n    scale: 0.1\n'
         '    offset: 0\n  }\n}\n')


def test_deeply_nested_unknown_field_is_one_line_not_a_recursion_error(tmp_path):
    depth = 500
    text = ('record {\n  key: "model.layers.1.self_attn.k_proj"\n  ' + "foo { " * depth + "}" * depth
            + "\n}\n" + ENTRY)
    rec = tmp_path / "deep.txt"
    rec.write_text(text)
    for call in (lambda: read_kv_factors(rec), lambda: check_record_file(rec),
                 lambda: write_kv_factors(rec, {"model.layers.2.self_attn.k_proj": ([0.1], [0])})):
        with pytest.raises(RecordFileError, match="nested more deeply"):
            call()
    assert rec.read_text() == text


def test_utf8_byte_order_mark_is_named(tmp_path):
    rec = tmp_path / "bom.txt"
    data = b"\xef\xbb\xbf" + ENTRY.encode()
    rec.write_bytes(data)
    for call in (lambda: read_kv_factors(rec), lambda: check_record_file(rec),
                 lambda: write_kv_factors(rec, {"model.layers.2.self_attn.k_proj": ([0.1], [0])})):
        with pytest.raises(RecordFileError, match="UTF-8 byte-order mark"):
            call()
    assert rec.read_bytes() == data


def test_merge_into_a_crlf_record_keeps_its_bytes_and_reads_back(tmp_path):
    """Documented behaviour: untouched CRLF bytes are kept, new and rewritten entries use LF."""
    rec = tmp_path / "crlf.txt"
    head = b'record {\r\n  key: "other.k_proj"\r\n  kv_cache_value {\r\n    scale: 0.5\r\n    offset: 0\r\n  }\r\n}\r\n'
    rec.write_bytes(head)
    write_kv_factors(rec, {"model.layers.0.self_attn.k_proj": ([0.25], [1])})
    assert rec.read_bytes().startswith(head)
    assert read_kv_factors(rec) == {"other.k_proj": ([0.5], [0]), "model.layers.0.self_attn.k_proj": ([0.25], [1])}
