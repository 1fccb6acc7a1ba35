"""fileio: atomic replacement refuses what it must not replace, cleans its litter; the lock."""
import json
import os
import socket
import stat
import subprocess
import sys

import pytest

from amct_hf.errors import OutputPathError
from amct_hf.fileio import atomic_replace, exclusive_lock, remove_stale_temps
from amct_hf.settings.validate import lock_timeout_seconds


def _write(text):
    calls = []

    def write(tmp):
        calls.append(tmp)
        with open(tmp, "w") as f:
            f.write(text)
    return write, calls


def test_replaces_and_keeps_mode(tmp_path):
    p = tmp_path / "o.json"
    p.write_text("old")
    os.chmod(p, 0o640)
    atomic_replace(str(p), _write("new")[0])
    assert p.read_text() == "new" and stat.S_IMODE(p.stat().st_mode) == 0o640
    assert os.listdir(tmp_path) == ["o.json"]


def test_refuses_special_files_and_read_only(tmp_path):
    targets = {}
    os.mkfifo(tmp_path / "fifo")
    targets["fifo"] = "is a FIFO"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(tmp_path / "sock"))
    targets["sock"] = "is a socket"
    os.mkdir(tmp_path / "dir")
    targets["dir"] = "is a directory"
    (tmp_path / "ro").write_text("keep")
    os.chmod(tmp_path / "ro", 0o444)
    targets["ro"] = r"is read-only \(mode 0444\)"
    if os.geteuid() == 0:
        os.mknod(tmp_path / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        targets["null"] = "is a character device"
    try:
        for name, match in targets.items():
            before = os.lstat(tmp_path / name)
            write, calls = _write("x")
            with pytest.raises(OutputPathError, match=f"{name} {match}.*; left untouched"):
                atomic_replace(str(tmp_path / name), write)
            assert calls == []
            after = os.lstat(tmp_path / name)
            assert (after.st_ino, after.st_mode, after.st_rdev) == \
                (before.st_ino, before.st_mode, before.st_rdev)
    finally:
        s.close()
    assert (tmp_path / "ro").read_text() == "keep"
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_export_to_a_fifo_is_refused(tmp_path):
    from amct_hf.export.factors import export_json
    from amct_hf.record.files import write_kv_factors
    rec = tmp_path / "r.txt"
    write_kv_factors(rec, {"model.layers.0.self_attn.k_proj": ([0.5], [0])})
    os.mkfifo(tmp_path / "out.json")
    with pytest.raises(ValueError, match="out.json is a FIFO"):
        export_json(rec, tmp_path / "out.json")
    assert stat.S_ISFIFO(os.lstat(tmp_path / "out.json").st_mode)


def test_symlink_is_written_through(tmp_path):
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    atomic_replace(str(link), _write(json.dumps({"a": 1}))[0])
    assert link.is_symlink() and json.loads(target.read_text()) == {"a": 1}


def test_stale_temps_of_dead_pids_only(tmp_path):
    pr = subprocess.Popen([sys.executable, "-c", "pass"])
    pr.wait()
    p = str(tmp_path / "o.json")
    names = [f".o.json.{pr.pid}.0123abcd.tmp", f".o.json.{os.getpid()}.0123abcd.tmp",
             f".x.json.{pr.pid}.0123abcd.tmp", f".o.json.{pr.pid}.0123abcd.tmp.bak"]
    for n in names:
        (tmp_path / n).write_text("partial")
    assert remove_stale_temps(p) == [names[0]]
    assert sorted(os.listdir(tmp_path)) == sorted(names[1:])


def test_lock_removes_its_file_and_times_out_naming_holder(tmp_path):
    lock = str(tmp_path / "r.txt.lock")
    with exclusive_lock(lock):
        assert open(lock).read() == f"{os.getpid()}\n"
        with pytest.raises(TimeoutError, match=rf"r.txt.lock \(held by pid {os.getpid()}\)"):
            with exclusive_lock(lock, 0.05):
                pass
    assert os.listdir(tmp_path) == []
    os.symlink(tmp_path / "elsewhere", lock)
    with pytest.raises(OutputPathError, match="symlink"):
        with exclusive_lock(lock):
            pass
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("value,want", [(None, None), (-1, None), (0, 0.0), (2, 2.0), (0.5, 0.5)])
def test_lock_timeout_values(value, want):
    assert lock_timeout_seconds(value) == want
