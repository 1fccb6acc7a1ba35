"""Record file (SPEC §4): format, incremental merge, foreign entries, errors, concurrency, kills."""
import logging
import os
import random
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
from google.protobuf import text_format
from hypothesis import given, settings
from hypothesis import strategies as st

from amct_hf.errors import RecordFileError, RecordOverwriteWarning
from amct_hf.record.files import read_kv_factors, write_kv_factors
from amct_hf.record.merge import index_record, parse_record_text
from amct_hf.record.schema import format_record

RECORD_PY = Path(__file__).resolve().parents[2] / "amct_hf" / "record" / "files.py"
K0 = "model.layers.0.self_attn.k_proj"
SPEC_EXAMPLE = """\
record {
  key: "model.layers.0.self_attn.k_proj"
  kv_cache_value {
    scale: 0.027280478
    scale: 0.032344416
    scale: 0.031658996
    scale: 0.033162832
    offset: -18
    offset: -46
    offset: -55
    offset: -69
  }
}
"""
SPEC_SCALES = [0.027280478, 0.032344416, 0.031658996, 0.033162832]
SPEC_OFFSETS = [-18, -46, -55, -69]


def f32(xs):
    return [struct.unpack("f", struct.pack("f", x))[0] for x in xs]


# --------------------------------------------------------------------------- format / round trip
def test_format_matches_spec_example(tmp_path):
    assert format_record({K0: (SPEC_SCALES, SPEC_OFFSETS)}) == SPEC_EXAMPLE
    p = tmp_path / "kv_cache.txt"
    # float64 inputs that are not float32 values are stored as float32 and printed shortest.
    scales64 = [s + 1e-12 for s in SPEC_SCALES]
    assert write_kv_factors(p, {K0: (scales64, SPEC_OFFSETS)}) == []
    assert p.read_text() == SPEC_EXAMPLE


@pytest.mark.parametrize("scales,offsets", [
    ([0.0123], [7]),                                                   # per-tensor
    ([0.1 * (i + 1) for i in range(64)], [i - 32 for i in range(64)]),  # per-channel
    ([1e-30, 3.4e38], [-(2 ** 31), 2 ** 31 - 1]),                     # float32 / int32 extremes
])
def test_round_trip(tmp_path, scales, offsets):
    p = tmp_path / "r.txt"
    write_kv_factors(p, {"a.k": (scales, offsets), "a.v": (scales[::-1], offsets[::-1])})
    got = read_kv_factors(p)
    assert got == {"a.k": (f32(scales), offsets), "a.v": (f32(scales[::-1]), offsets[::-1])}
    assert parse_record_text(p.read_text()) == got


def test_missing_and_empty_files(tmp_path):
    assert read_kv_factors(tmp_path / "nope.txt") == {}
    p = tmp_path / "empty.txt"
    p.write_text("")
    assert read_kv_factors(p) == {}
    write_kv_factors(p, {K0: (SPEC_SCALES, SPEC_OFFSETS)})
    assert p.read_text() == SPEC_EXAMPLE
    # A new file in a not-yet-existing directory.
    q = tmp_path / "sub" / "dir" / "r.txt"
    write_kv_factors(q, {"x": ([0.5], [1])})
    assert read_kv_factors(q) == {"x": ([0.5], [1])}


# --------------------------------------------------------------------------- merge
def test_merge_keeps_other_layers_and_appends_in_order(tmp_path):
    p = tmp_path / "r.txt"
    write_kv_factors(p, {"l0": ([0.5], [1]), "l1": ([0.25], [2])})
    write_kv_factors(p, {"l2": ([0.125, 0.5], [3, 4])})
    with pytest.warns(RecordOverwriteWarning, match="'l1'.*fields: scale$"):
        assert write_kv_factors(p, {"l1": ([0.75], [2]), "l3": ([1.5], [0])}) == ["l1"]
    got = read_kv_factors(p)
    assert list(got) == ["l0", "l1", "l2", "l3"]
    assert got == {"l0": ([0.5], [1]), "l1": ([0.75], [2]), "l2": ([0.125, 0.5], [3, 4]),
                   "l3": ([1.5], [0])}
    # Canonical input stays canonical: the merged file equals a fresh print.
    assert p.read_text() == format_record(got)


@pytest.mark.parametrize("new,fields", [
    (([0.5, 0.25], [9, 2]), "overwritten fields: offset"),
    (([0.5, 0.75], [1, 2]), "overwritten fields: scale"),
    (([0.5], [1]), "overwritten fields: scale, offset"),
])
def test_overwrite_warns_with_layer_and_changed_fields(tmp_path, caplog, new, fields):
    p = tmp_path / "kv_cache.txt"
    write_kv_factors(p, {K0: ([0.5, 0.25], [1, 2]), "other": ([0.1], [0])})
    with pytest.warns(RecordOverwriteWarning) as rec, caplog.at_level(logging.INFO, "amct_hf"):
        assert write_kv_factors(p, {K0: new, "fresh": ([0.3], [3])}) == [K0]
    msgs = [str(w.message) for w in rec if issubclass(w.category, RecordOverwriteWarning)]
    assert len(msgs) == 1
    msg = msgs[0]
    assert f"layer '{K0}' already had kv_cache_value" in msg and str(p) in msg
    assert msg.endswith(fields)
    logged = [r.getMessage() for r in caplog.records if r.name == "amct_hf"]
    assert logged == []  # one report, not a log line and a warning
    assert read_kv_factors(p)[K0] == (f32(new[0]), new[1])
    assert read_kv_factors(p)["other"] == (f32([0.1]), [0])


def test_rewriting_the_same_values_says_nothing_and_changes_are_summed_up(tmp_path):
    p = tmp_path / "kv_cache.txt"
    layers = {f"model.layers.{i}.self_attn.k_proj": ([0.5 + i], [i]) for i in range(6)}
    write_kv_factors(p, layers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert write_kv_factors(p, layers) == list(layers)  # a rerun: replaced, silently
    changed = {n: ([s[0] * 2], o) for n, (s, o) in layers.items()}
    with pytest.warns(RecordOverwriteWarning) as rec:
        write_kv_factors(p, changed)
    assert len(rec) == 1
    assert "6 entries already had kv_cache_value and were overwritten with changed values: " \
           "'model.layers.0.self_attn.k_proj' (scale)" in str(rec[0].message)
    assert str(rec[0].message).endswith("and 3 more")


def test_no_warning_for_new_layers(tmp_path):
    p = tmp_path / "r.txt"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert write_kv_factors(p, {"a": ([0.5], [0])}) == []
        assert write_kv_factors(p, {"b": ([0.5], [0])}) == []


# --------------------------------------------------------------------------- foreign content
FOREIGN = """\
# written by another tool; this comment must survive
record {
  key: "conv1"
  value {
    scale_d: 0.5
    offset_d: 3
    scale_w: 0.1
    offset_w: 0
  }
}
prune_record {
}
prune_record {
  producer {
    name: "conv1"
    attr { name: "type" s: "Conv2d" }
  }
  consumer { name: "conv2" }
  selective_prune { name: "conv1" attr { name: "mask" ints: [1, 0, 1] } }
}
record { key: "fc" value { scale_d: 0.25 offset_d: -1 future_field: 7 } }
record {
  key: "model.layers.0.self_attn.v_proj"
  value {
    scale_d: 0.125
  }
  kv_cache_value {
    scale: 0.5
    offset: 1
  }
}
"""


def test_foreign_entries_survive_merge(tmp_path):
    p = tmp_path / "r.txt"
    p.write_text(FOREIGN)
    v0 = "model.layers.0.self_attn.v_proj"
    with pytest.warns(RecordOverwriteWarning, match="v_proj"):
        assert write_kv_factors(p, {v0: ([0.75, 0.25], [4, 5]), "conv1": ([0.2], [6]),
                                    K0: ([0.3], [7])}) == [v0]
    text = p.read_text()
    # Everything up to the edited entries is byte-identical (comment, prune bodies with
    # fields the schema does not know, the one-line entry with an unknown field).
    head = FOREIGN.split('record {\n  key: "conv1"')[0]
    assert text.startswith(head)
    for block in ('prune_record {\n}\n', FOREIGN[FOREIGN.index("prune_record {\n  producer"):
                                                FOREIGN.index("record { key: \"fc\"")],
                  'record { key: "fc" value { scale_d: 0.25 offset_d: -1 future_field: 7 } }\n'):
        assert block in text
    # conv1 keeps its value {} and gains kv_cache_value next to it; v_proj keeps value {}.
    assert '  key: "conv1"\n  value {\n    scale_d: 0.5\n    offset_d: 3\n    scale_w: 0.1\n' \
           '    offset_w: 0\n  }\n  kv_cache_value {\n    scale: 0.2\n    offset: 6\n  }\n}\n' in text
    assert ('  key: "model.layers.0.self_attn.v_proj"\n  value {\n    scale_d: 0.125\n  }\n'
            '  kv_cache_value {\n    scale: 0.75\n    scale: 0.25\n    offset: 4\n    offset: 5\n'
            '  }\n}\n') in text
    assert text.count("kv_cache_value") == 3
    assert text.endswith(format_record({K0: ([0.3], [7])}))
    assert read_kv_factors(p) == {"conv1": (f32([0.2]), [6]), v0: ([0.75, 0.25], [4, 5]),
                                  K0: (f32([0.3]), [7])}
    # The parsed values of the foreign entries are unchanged too.
    from google.protobuf import text_format

    from amct_hf.record.schema import ScaleOffsetRecord
    rec = ScaleOffsetRecord()
    text_format.Parse(text, rec, allow_unknown_field=True)
    conv1 = next(e for e in rec.record if e.key == "conv1").value
    assert (conv1.scale_d, conv1.offset_d, list(conv1.scale_w), list(conv1.offset_w)) == \
        (0.5, 3, f32([0.1]), [0])
    assert len(rec.prune_record) == 2


def test_one_line_entry_is_edited_in_place(tmp_path):
    p = tmp_path / "r.txt"
    p.write_text('record { key: "a" value { scale_d: 0.5 } kv_cache_value { scale: 1 offset: 0 } }\n'
                 'record { key: "b" kv_cache_value { scale: 2 offset: 1 } }\n')
    with pytest.warns(RecordOverwriteWarning, match="'a'.*scale, offset"):
        write_kv_factors(p, {"a": ([0.25, 0.5], [3, 4])})
    text = p.read_text()
    assert text.splitlines()[1] == 'record { key: "b" kv_cache_value { scale: 2 offset: 1 } }'
    assert 'value { scale_d: 0.5 }' in text.splitlines()[0]
    assert read_kv_factors(p) == {"a": ([0.25, 0.5], [3, 4]), "b": ([2.0], [1])}


def test_duplicate_keys_all_updated(tmp_path):
    p = tmp_path / "r.txt"
    p.write_text(format_record({"a": ([1.0], [0])}) * 2)
    with pytest.warns(RecordOverwriteWarning):
        write_kv_factors(p, {"a": ([2.0], [1])})
    assert p.read_text() == format_record({"a": ([2.0], [1])}) * 2


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("bad", [
    'record { key: "x" kv_cache_value { scale: oops } }\n',
    'record { key: "x" kv_cache_value { scale: 1.0 }\n',      # unbalanced
    'record { key: "x" kv_cache_value { offset: 4294967296 } }\n',
    'record { key: "x" key: "y" }\n',
    'not a record at all {{{\n',
])
def test_corrupted_file_raises_and_is_untouched(tmp_path, bad):
    p = tmp_path / "kv_cache.txt"
    p.write_bytes(bad.encode())
    mtime = p.stat().st_mtime_ns
    with pytest.raises(RecordFileError, match=str(p)):
        write_kv_factors(p, {"y": ([0.5], [1])})
    with pytest.raises(RecordFileError, match=str(p)):
        read_kv_factors(p)
    assert p.read_bytes() == bad.encode() and p.stat().st_mtime_ns == mtime
    assert [q.name for q in tmp_path.iterdir() if q.name.endswith(".tmp")] == []


def test_parse_error_names_parser_message(tmp_path):
    p = tmp_path / "kv_cache.txt"
    p.write_text('record { key: "x" kv_cache_value { scale: oops } }\n')
    with pytest.raises(RecordFileError) as ei:
        read_kv_factors(p)
    assert "1:" in str(ei.value) and "oops" in str(ei.value)


def test_directory_and_non_utf8(tmp_path):
    with pytest.raises(RecordFileError, match="directory"):
        write_kv_factors(tmp_path, {"a": ([0.5], [0])})
    with pytest.raises(RecordFileError):
        read_kv_factors(tmp_path)
    p = tmp_path / "bin.txt"
    p.write_bytes(b"\xff\xfe\x00record")
    with pytest.raises(RecordFileError, match="UTF-8"):
        write_kv_factors(p, {"a": ([0.5], [0])})
    assert p.read_bytes() == b"\xff\xfe\x00record"


@pytest.mark.parametrize("factors", [
    {"l": ([float("nan")], [0])},
    {"l": ([float("inf")], [0])},
    {"l": ([0.0], [0])},
    {"l": ([-0.5], [0])},
    {"l": ([1e39], [0])},       # overflows float32
    {"l": ([1e-50], [0])},      # underflows float32 to 0
    {"l": ([], [])},
    {"l": ([0.5, 0.5], [1])},
    {"l": ([0.5], [2 ** 31])},
    {"l": ([0.5], [-(2 ** 31) - 1])},
    {"l": ([0.5], [1.5])},
    {"l": ([0.5], [True])},
    {"l": ("0.5", [1])},
    {"l": ([0.5],)},
    {"": ([0.5], [1])},
    {3: ([0.5], [1])},
])
def test_invalid_factors_raise_and_write_nothing(tmp_path, factors):
    p = tmp_path / "r.txt"
    original = format_record({"keep": ([0.5], [1])})
    p.write_text(original)
    # The valid entry before the bad one must not be written either.
    with pytest.raises(ValueError) as ei:
        write_kv_factors(p, {"good": ([0.5], [1]), **factors})
    name = next(iter(factors))
    if isinstance(name, str) and name:
        assert repr(name) in str(ei.value)
    assert p.read_text() == original
    q = tmp_path / "new.txt"
    with pytest.raises(ValueError):
        write_kv_factors(q, factors)
    assert not q.exists()


def test_permissions_and_symlink_preserved(tmp_path):
    p = tmp_path / "r.txt"
    write_kv_factors(p, {"a": ([0.5], [0])})
    os.chmod(p, 0o640)
    link = tmp_path / "link.txt"
    link.symlink_to(p)
    write_kv_factors(link, {"b": ([0.5], [0])})
    assert link.is_symlink()
    assert stat.S_IMODE(p.stat().st_mode) == 0o640
    assert list(read_kv_factors(p)) == ["a", "b"]


# --------------------------------------------------------------------------- processes
# the child processes import the installed package's record module, as users do
_LOAD = textwrap.dedent(f"""
    import sys
    sys.path.insert(0, {str(RECORD_PY.parents[2])!r})
    from amct_hf.record import files as rec
""")


def test_concurrent_writers_lose_nothing(tmp_path):
    p = tmp_path / "kv_cache.txt"
    child = _LOAD + textwrap.dedent("""
        w = int(sys.argv[1])
        for i in range(10):
            rec.write_kv_factors(sys.argv[2], {f"w{w}.layer{i}": ([0.01 * (i + 1)] * 8, [w] * 8)})
    """)
    procs = [subprocess.Popen([sys.executable, "-c", child, str(w), str(p)]) for w in range(4)]
    assert [pr.wait(timeout=60) for pr in procs] == [0] * 4
    got = read_kv_factors(p)
    assert len(got) == 40
    for w in range(4):
        for i in range(10):
            assert got[f"w{w}.layer{i}"] == (f32([0.01 * (i + 1)]) * 8, [w] * 8)


def test_sigkill_mid_write_leaves_complete_file(tmp_path):
    p = tmp_path / "kv_cache.txt"
    layers, channels = 48, 128

    def full_set(it):
        return {f"model.layers.{i}.self_attn.{kv}_proj":
                ([0.001 * (it + 1)] * channels, [it % 100 - 50] * channels)
                for i in range(layers // 2) for kv in "kv"}

    write_kv_factors(p, full_set(0))
    child = _LOAD + textwrap.dedent(f"""
        import warnings; warnings.simplefilter("ignore")
        import logging; logging.disable(logging.CRITICAL)
        layers, channels = {layers}, {channels}
        it = 1
        while True:
            rec.write_kv_factors(sys.argv[1], {{
                f"model.layers.{{i}}.self_attn.{{kv}}_proj":
                ([0.001 * (it + 1)] * channels, [it % 100 - 50] * channels)
                for i in range(layers // 2) for kv in "kv"}})
            if it == 1:
                print("ready", flush=True)
            it += 1
    """)
    def snapshot():
        st = p.stat()
        return set(os.listdir(tmp_path)), st.st_ino, st.st_mtime_ns, st.st_size

    rng = random.Random(1234)
    for round_ in range(8):
        pr = subprocess.Popen([sys.executable, "-c", child, str(p)], stdout=subprocess.PIPE)
        try:
            assert pr.stdout.readline().strip() == b"ready"
            time.sleep(rng.uniform(0.0, 0.3))
            if round_ % 2:
                # Writing is ~1% of the child's loop (parsing dominates), so a random kill
                # rarely lands in it: on odd rounds kill on the first sign of a write
                # (a new file in the directory or the target changing).
                before, deadline = snapshot(), time.monotonic() + 2
                while snapshot() == before and time.monotonic() < deadline:
                    pass
        finally:
            os.kill(pr.pid, signal.SIGKILL)
            pr.wait()
            pr.stdout.close()
        assert pr.returncode == -signal.SIGKILL
        got = read_kv_factors(p)  # parses: old or new complete file
        scales = {tuple(s) for s, _ in got.values()}
        assert len(got) == layers and len(scales) == 1  # one complete generation
        (s,) = scales
        it = round(s[0] / 0.001) - 1
        assert got == {k: (f32(a), b) for k, (a, b) in full_set(it).items()}
        assert it >= 1  # "ready" comes after the child's first complete write
    # The writer is resumable after a kill: a kill leaves at most stale *.tmp files and
    # a lock file, never a held lock.
    write_kv_factors(p, {"after": ([0.5], [0])}, lock_timeout=5)
    assert "after" in read_kv_factors(p)


# --------------------------------------------------------------------------- fast scanner vs protobuf
# The merge no longer parses the whole file with protobuf: canonical entries are
# matched by a pattern, other fields parsed alone. These tests hold the scanner to protobuf.
_SCALE_TOKENS = ["0.5", "1", "1.", ".5", "-.5", "01.5", "0.027280478", "1e-30", "3.4e+38", "1e39",
                 "1e-50", "1E5", "1.0f", "+1", "0x1", "inf", "-inf", "nan", "-nan", "Infinity",
                 "1e", "oops", "2.5e-05", "-0.25", "0", "00"]
_OFFSET_TOKENS = ["0", "-0", "7", "-18", "07", "0x10", "999999999", "1234567890", "2147483647",
                  "2147483648", "-2147483648", "-2147483649", "1.5", "+3"]


def _random_field(rng):
    key = rng.choice(["a", "b", "model.layers.0.self_attn.k_proj", "x y", "é", "it's"])
    n = rng.randint(0, 3)
    scales = [rng.choice(_SCALE_TOKENS[:10] if rng.random() < 0.7 else _SCALE_TOKENS)
              for _ in range(n)]
    offsets = [rng.choice(_OFFSET_TOKENS[:4] if rng.random() < 0.7 else _OFFSET_TOKENS)
               for _ in range(rng.choice([n, n, n, max(0, n - 1)]))]
    body = "".join(f"    scale: {s}\n" for s in scales) + "".join(f"    offset: {o}\n" for o in offsets)
    kind = rng.randrange(9)
    if kind <= 3:  # canonical layout
        return f'record {{\n  key: "{key}"\n  kv_cache_value {{\n{body}  }}\n}}\n'
    inline = " ".join(f"scale: {s}" for s in scales) + " " + " ".join(f"offset: {o}" for o in offsets)
    return rng.choice([
        f'record {{ key: "{key}" kv_cache_value {{ {inline} }} }}\n',
        f'record {{\n  key: "{key}"\n  value {{\n    scale_d: 0.5\n  }}\n}}\n',
        f'record: {{ key: "{key}" value {{ future: 1 }} kv_cache_value < {inline} > }};\n',
        "prune_record {\n  producer { name: \"c\" attr { ints: [1, 2] } }\n}\n",
        f'record: [{{ key: "{key}" }}, {{ key: "b" kv_cache_value {{ {inline} }} }}]\n',
        f"# a comment {key}\n",
        f'unknown_top {{ key: "{key}" }} record {{ key: "{key}" kv_cache_value {{ {inline} }} }}\n',
        f'record {{\n  key: "{key}"  # trailing comment\n  kv_cache_value {{\n{body}  }}\n}}\n',
    ])


def _random_text(rng):
    text = "".join(_random_field(rng) for _ in range(rng.randint(0, 5)))
    if text and rng.random() < 0.25:  # corrupt one character
        i = rng.randrange(len(text))
        text = text[:i] + rng.choice(['{', '}', '"', ':', '#', '\n', '', 'x', '<']) + text[i + 1:]
    return text


def _protobuf_read(text):
    from google.protobuf import text_format

    from amct_hf.record.schema import ScaleOffsetRecord
    rec = ScaleOffsetRecord()
    text_format.Parse(text, rec, allow_unknown_field=True)
    return {e.key: (list(e.kv_cache_value.scale), list(e.kv_cache_value.offset))
            for e in rec.record if e.HasField("kv_cache_value")}


def _valid(values):
    scales, offsets = values
    return bool(scales) and len(scales) == len(offsets) and all(
        s == s and 0 < s < float("inf") for s in scales)


def test_scanner_reads_exactly_what_protobuf_reads():
    from google.protobuf import text_format
    rng = random.Random(2024)
    seen = {"parsed": 0, "refused": 0, "invalid": 0}
    for _ in range(600):
        text = _random_text(rng)
        try:
            want = _protobuf_read(text)
        except text_format.ParseError as e:
            seen["refused"] += 1
            with pytest.raises(RecordFileError) as ei:
                parse_record_text(text)
            # the same message as a whole-file parse, line:column included
            assert str(ei.value) == f"record <text> does not parse: {e}", text
            continue
        bad = [k for k, v in want.items() if not _valid(v)]
        if bad:
            seen["invalid"] += 1
            with pytest.raises(RecordFileError, match="invalid kv_cache_value") as ei:
                parse_record_text(text)
            assert repr(bad[0]) in str(ei.value), text
        else:
            seen["parsed"] += 1
            assert parse_record_text(text) == want, text
    assert min(seen.values()) >= 50, seen  # every branch exercised


def test_merge_of_random_records_matches_protobuf(tmp_path):
    from google.protobuf import text_format
    rng = random.Random(7)
    p = tmp_path / "r.txt"
    merged = 0
    for _ in range(300):
        text = _random_text(rng)
        try:
            before = _protobuf_read(text)
        except text_format.ParseError:
            continue
        p.write_text(text)
        new = {rng.choice(["a", "b", "é", "it's", "fresh"]): ([0.25, 0.5][:rng.randint(1, 2)], [3, -4])}
        new = {k: (s, [3, -4][:len(s)]) for k, (s, _) in new.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RecordOverwriteWarning)
            try:
                write_kv_factors(p, new)
            except RecordFileError as e:
                assert "list form" in str(e), (text, str(e))
                assert p.read_text() == text
                continue
        merged += 1
        out = p.read_text()
        got = _protobuf_read(out)
        want = {**before, **new}
        assert got.keys() == want.keys(), (text, out)
        for k in want:  # nan-safe: compare float32 bits
            assert [struct.pack("f", s) for s in got[k][0]] == \
                   [struct.pack("f", s) for s in want[k][0]] and got[k][1] == want[k][1], (text, out)
        if next(iter(new)) not in before and "fresh" in new:
            assert out.startswith(text)  # an append leaves every byte before it in place
    assert merged >= 100


# ------------------------------------------------ invalid entries, paths, litter, waits
def test_invalid_foreign_entry_is_kept_and_named_on_read(tmp_path):
    from amct_hf import QuantCalibrationOp
    p = tmp_path / "r.txt"
    bad = 'record {\n  key: "foreign.k"\n  kv_cache_value {\n    scale: nan\n    offset: 0\n  }\n}\n'
    original = format_record({"keep": ([0.5], [1])}) + bad
    p.write_text(original)
    # writing other layers succeeds (it used to fail with "internal merge check failed")
    assert write_kv_factors(p, {"mine": ([0.25], [2])}) == []
    text = p.read_text()
    assert text.startswith(original) and bad in text
    for reader in (lambda: read_kv_factors(p), lambda: parse_record_text(text)):
        with pytest.raises(RecordFileError, match=r"'foreign\.k'.*scale nan \(channel 0\)"):
            reader()
    QuantCalibrationOp(p)  # the operator's early check does not judge others' values
    # the invalid entry itself can be overwritten, with the warning naming what changed
    with pytest.warns(RecordOverwriteWarning, match="'foreign.k'.*fields: scale$"):
        write_kv_factors(p, {"foreign.k": ([0.125], [0])})
    assert read_kv_factors(p) == {"keep": ([0.5], [1]), "foreign.k": ([0.125], [0]),
                                  "mine": ([0.25], [2])}


@pytest.mark.parametrize("body,match", [
    ("scale: inf\n    offset: 0", r"scale inf"),
    ("scale: -0.5\n    offset: 0", r"scale -0\.5"),
    ("scale: 0\n    offset: 0", r"scale 0\.0"),
    ("scale: 1e39\n    offset: 0", r"scale inf"),
    ("scale: 0.5\n    scale: 0.5\n    offset: 0", r"2 scale\(s\) and 1 offset"),
])
def test_invalid_values_are_named(tmp_path, body, match):
    p = tmp_path / "r.txt"
    p.write_text(f'record {{\n  key: "l"\n  kv_cache_value {{\n    {body}\n  }}\n}}\n')
    with pytest.raises(RecordFileError, match=rf"{p}: layer 'l' has an invalid kv_cache_value: .*{match}"):
        read_kv_factors(p)


def _unblock_fifo_later(path, delay=2.0):
    """If the code under test opens the FIFO, it blocks: open the write end after a while so
    that a failure shows as a failed assertion, not a hung test."""
    import threading

    def opener():
        time.sleep(delay)
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass  # nobody reading: the code under test did not open it
    t = threading.Thread(target=opener, daemon=True)
    t.start()
    return t


def _special_files(tmp_path):
    import socket
    made = {}
    fifo = tmp_path / "fifo.txt"
    os.mkfifo(fifo)
    made["FIFO"] = fifo
    sock = tmp_path / "sock.txt"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock))
    made["socket"] = sock
    if os.geteuid() == 0:
        dev = tmp_path / "null.txt"
        os.mknod(dev, stat.S_IFCHR | 0o600, os.makedev(1, 3))
        made["character device"] = dev
    return made, s


def test_non_regular_record_paths_are_refused_untouched(tmp_path):
    from amct_hf import QuantCalibrationOp
    made, sock = _special_files(tmp_path)
    try:
        for kind, path in made.items():
            before = os.lstat(path)
            link = tmp_path / f"link-to-{path.name}"
            link.symlink_to(path)
            for target in (path, link):
                t = _unblock_fifo_later(path) if kind == "FIFO" else None
                with pytest.raises(RecordFileError, match=f"is a {kind}, not a regular file"):
                    write_kv_factors(target, {"a": ([0.5], [0])})
                with pytest.raises(RecordFileError, match=f"is a {kind}"):
                    read_kv_factors(target)
                with pytest.raises(RecordFileError, match=f"is a {kind}"):
                    QuantCalibrationOp(target)
                if t is not None:
                    t.join()
                after = os.lstat(path)
                assert (after.st_ino, after.st_mode, after.st_rdev) == \
                    (before.st_ino, before.st_mode, before.st_rdev)
            assert link.is_symlink()
        if os.geteuid() != 0:
            pytest.skip("character device case needs root (mknod)")
    finally:
        sock.close()
    assert not [n for n in os.listdir(tmp_path) if n.endswith((".lock", ".tmp"))]


def test_read_only_record_is_refused_even_as_root(tmp_path):
    from amct_hf import QuantCalibrationOp
    p = tmp_path / "r.txt"
    write_kv_factors(p, {"a": ([0.5], [0])})
    os.chmod(p, 0o444)
    st, text = p.stat(), p.read_text()
    with pytest.raises(RecordFileError, match=r"is read-only \(mode 0444\); left untouched"):
        write_kv_factors(p, {"b": ([0.5], [0])})
    with pytest.raises(RecordFileError, match="read-only"):
        QuantCalibrationOp(p)
    assert p.read_text() == text and p.stat().st_ino == st.st_ino
    assert stat.S_IMODE(p.stat().st_mode) == 0o444
    assert read_kv_factors(p) == {"a": ([0.5], [0])}  # reading is fine
    assert sorted(os.listdir(tmp_path)) == ["r.txt"]


def test_no_lock_file_left_after_a_write_or_a_refusal(tmp_path):
    p = tmp_path / "r.txt"
    write_kv_factors(p, {"a": ([0.5], [0])})
    assert sorted(os.listdir(tmp_path)) == ["r.txt"]
    p.write_text("not a record {{{\n")
    with pytest.raises(RecordFileError):
        write_kv_factors(p, {"a": ([0.5], [0])})
    assert sorted(os.listdir(tmp_path)) == ["r.txt"]
    # a lock file left by a killed writer is used and removed by the next write
    (tmp_path / "q.txt.lock").write_text("12345\n")
    write_kv_factors(tmp_path / "q.txt", {"a": ([0.5], [0])})
    assert sorted(os.listdir(tmp_path)) == ["q.txt", "r.txt"]


def _dead_pid():
    pr = subprocess.Popen([sys.executable, "-c", "pass"])
    pr.wait()
    return pr.pid


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    p = tmp_path / "r.txt"
    write_kv_factors(p, {"a": ([0.5], [0])})
    dead = _dead_pid()
    stale = tmp_path / f".r.txt.{dead}.0badf00d.tmp"
    live = tmp_path / f".r.txt.{os.getpid()}.cafebabe.tmp"     # a writer still running
    other = tmp_path / f".other.txt.{dead}.0badf00d.tmp"       # another target's
    odd = tmp_path / f".r.txt.{dead}.notours.tmp"               # not our pattern
    for f in (stale, live, other, odd):
        f.write_text("partial")
    write_kv_factors(p, {"b": ([0.5], [0])})
    assert sorted(os.listdir(tmp_path)) == sorted(["r.txt", live.name, other.name, odd.name])
    assert list(read_kv_factors(p)) == ["a", "b"]


def _wait_stopped(pid, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.01)
    raise AssertionError("child did not stop")


def test_stopped_writer_does_not_block_others_forever(tmp_path):
    from amct_hf import QuantCalibrationOp
    p = tmp_path / "r.txt"
    # the child stops itself (SIGSTOP) while it holds the lock, just before its file write
    child = _LOAD + textwrap.dedent("""
        import os, signal
        real = rec.write_text_atomic
        def stop_then_write(*a):
            os.kill(os.getpid(), signal.SIGSTOP)
            real(*a)
        rec.write_text_atomic = stop_then_write
        rec.write_kv_factors(sys.argv[1], {"child": ([0.5], [1])})
    """)
    pr = subprocess.Popen([sys.executable, "-c", child, str(p)])
    try:
        _wait_stopped(pr.pid)
        t0 = time.monotonic()
        with pytest.raises(RecordFileError) as ei:
            write_kv_factors(p, {"me": ([0.5], [0])}, lock_timeout=0.5)
        assert time.monotonic() - t0 < 20
        msg = str(ei.value)
        assert f"{p}.lock" in msg and f"pid {pr.pid}" in msg and "timed out after 0.5 s" in msg
        op = QuantCalibrationOp(p, {"batch_num": 1}, lock_timeout=0.2)
        assert op.lock_timeout == 0.2
        import torch
        with pytest.raises(RecordFileError, match="r.txt.lock"):
            op("me", torch.ones(4, 2))
        assert not p.exists()  # nothing was written by the waiters
    finally:
        os.kill(pr.pid, signal.SIGCONT)
        assert pr.wait(timeout=60) == 0
    write_kv_factors(p, {"me": ([0.5], [0])}, lock_timeout=5)
    assert read_kv_factors(p) == {"child": ([0.5], [1]), "me": ([0.5], [0])}
    assert sorted(os.listdir(tmp_path)) == ["r.txt"]


@pytest.mark.parametrize("bad", [True, "5", float("nan"), [1]])
def test_lock_timeout_is_validated(tmp_path, bad):
    from amct_hf import QuantCalibrationOp
    with pytest.raises(ValueError, match="lock_timeout"):
        write_kv_factors(tmp_path / "r.txt", {"a": ([0.5], [0])}, lock_timeout=bad)
    with pytest.raises(ValueError, match="lock_timeout"):
        QuantCalibrationOp(tmp_path / "r.txt", lock_timeout=bad)
    assert os.listdir(tmp_path) == []


def test_many_writers_with_the_self_removing_lock(tmp_path):
    # the lock file is unlinked at every release while others wait on it: nothing may be lost
    p = tmp_path / "kv_cache.txt"
    child = _LOAD + textwrap.dedent("""
        w = int(sys.argv[1])
        for i in range(15):
            rec.write_kv_factors(sys.argv[2], {f"w{w}.layer{i}": ([0.5], [w])})
    """)
    procs = [subprocess.Popen([sys.executable, "-c", child, str(w), str(p)]) for w in range(6)]
    assert [pr.wait(timeout=120) for pr in procs] == [0] * 6
    got = read_kv_factors(p)
    assert got == {f"w{w}.layer{i}": ([0.5], [w]) for w in range(6) for i in range(15)}
    assert sorted(os.listdir(tmp_path)) == ["kv_cache.txt"]


def test_index_kept_from_our_last_write_equals_a_fresh_scan(tmp_path):
    # The writer reuses the index of the text it wrote itself (the operator writes one layer
    # at a time). It must equal a fresh scan, and a file changed by anyone else is rescanned.
    from google.protobuf import text_format

    from amct_hf.record import files as record
    rng = random.Random(11)
    p = tmp_path / "r.txt"
    chains = 0
    while chains < 40:
        text = _random_text(rng)
        try:
            want = _protobuf_read(text)
        except text_format.ParseError:
            continue
        if any(not _valid(v) for v in want.values()) or "record: [" in text:
            continue
        chains += 1
        p.write_text(text)
        for step in range(4):
            layer = rng.choice(["a", "b", "é", f"new{step}"])
            value = ([0.5 * (step + 1)], [step])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RecordOverwriteWarning)
                write_kv_factors(p, {layer: value})
            want[layer] = (f32(value[0]), value[1])
            out = p.read_text()
            kept_text, kept = record._last_write[os.path.realpath(p)]
            assert kept_text == out and kept == index_record(out, "x")
            assert _protobuf_read(out) == want
        # someone else rewrites the file in place, same size: our index must not be used
        changed = out.replace("scale: 0.5\n", "scale: 0.7\n") if "scale: 0.5\n" in out else None
        if changed is not None:
            with open(p, "r+") as f:
                f.write(changed)
            write_kv_factors(p, {"z": ([0.25], [1])})
            assert _protobuf_read(p.read_text()) == {**_protobuf_read(changed), "z": ([0.25], [1])}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.from_regex(r"[a-z0-9_.]{1,12}", fullmatch=True),
                          st.lists(st.floats(2.0 ** -126, 2.0 ** 127, width=32), min_size=1, max_size=6),
                          st.integers(-2 ** 31, 2 ** 31 - 1)), min_size=1, max_size=4,
                unique_by=lambda t: t[0]))
def test_fast_record_printer_is_protobufs(entries):
    """format_record (and every merge) prints kv_cache_value itself; byte for byte what
    protobuf's text printer writes."""
    from amct_hf.record import schema as rec
    factors = {name: (scales, [off] * len(scales)) for name, scales, off in entries}
    msg = rec.ScaleOffsetRecord()
    for name, (scales, offsets) in factors.items():
        entry = msg.record.add(key=name)
        entry.kv_cache_value.scale.extend(scales)
        entry.kv_cache_value.offset.extend(offsets)
    assert rec.format_record(factors) == text_format.MessageToString(msg, as_utf8=True)
