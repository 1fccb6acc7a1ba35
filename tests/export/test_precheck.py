"""Refusals that come before the first forward pass (the user keeps the minutes a
calibration takes): the record's directory, list-form records holding the model's keys,
``calibrate --export-ascend-c8 OUT``'s output and record; and a target's own algorithm
validating the user's fields."""
import errno
import os

import pytest

import amct_hf.calibrate as calibrate_module
from amct_hf.errors import RecordFileError
from amct_hf.record.files import read_kv_factors, write_kv_factors

from ..test_cli import _calibrate, tiny  # noqa: F401  (the tiny model fixture)


@pytest.fixture
def no_calibration(monkeypatch):
    """Fail the test if the calibration gets past loading the model."""
    def started(*args, **kwargs):
        raise AssertionError("the calibration started before the refusal")
    monkeypatch.setattr(calibrate_module, "tokenize_samples", started)


def test_record_in_a_directory_that_takes_no_file_is_refused_before_loading(tiny, tmp_path, monkeypatch,  # noqa: F811
                                                                           capsys):
    model_dir, corpus = tiny
    ro = tmp_path / "ro"
    ro.mkdir()
    real_mkdir, real_open = os.mkdir, os.open

    def read_only(path, *args, **kwargs):  # a read-only filesystem under ro/ (root ignores modes)
        if os.path.dirname(os.fspath(path)) == str(ro):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    def read_only_open(path, flags, *args, **kwargs):
        if os.path.dirname(os.fspath(path)) == str(ro) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_open(path, flags, *args, **kwargs)
    monkeypatch.setattr(os, "mkdir", read_only)
    monkeypatch.setattr(os, "open", read_only_open)
    monkeypatch.setattr(calibrate_module, "load_model", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("the model was loaded before the refusal")))
    assert _calibrate(model_dir, corpus, ro / "kv.txt") == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Read-only file system" in errors[0] and str(ro) in errors[0], err


LIST_FORM = """record: [
  { key: "model.layers.0.self_attn.k_proj" kv_cache_value { scale: 0.1 offset: 0 } },
  { key: "elsewhere.k_proj" kv_cache_value { scale: 0.2 offset: 0 } }
]
"""


def test_list_form_record_holding_a_model_key_is_refused_before_calibrating(tiny, tmp_path, capsys,  # noqa: F811
                                                                            no_calibration):
    model_dir, corpus = tiny
    rec = tmp_path / "kv.txt"
    rec.write_text(LIST_FORM)
    assert _calibrate(model_dir, corpus, rec) == 2
    err = capsys.readouterr().err
    assert "'model.layers.0.self_attn.k_proj' uses the list form" in err
    assert rec.read_text() == LIST_FORM


def test_list_form_record_of_other_keys_is_fine(tmp_path):
    from amct_hf.modeling.layout import check_record_editable
    from tests.tiny_models import build

    rec = tmp_path / "kv.txt"
    rec.write_text(LIST_FORM.replace("model.layers.0", "other.layers.0"))
    check_record_editable(rec, build("llama"))
    rec.write_text(LIST_FORM)
    with pytest.raises(RecordFileError, match="list form"):
        check_record_editable(rec, build("llama"))


def test_export_ascend_c8_out_not_empty_refused_before_calibrating(tiny, tmp_path, capsys,  # noqa: F811
                                                                   no_calibration):
    model_dir, corpus = tiny
    out = tmp_path / "c8"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    rec = tmp_path / "kv.txt"
    assert _calibrate(model_dir, corpus, rec, "--symmetric", "--export-ascend-c8", str(out)) == 2
    assert "not empty" in capsys.readouterr().err
    assert not rec.exists() and os.listdir(out) == ["mine.txt"]
    assert _calibrate(model_dir, corpus, rec, "--symmetric", "--export-ascend-c8", str(model_dir)) == 2
    assert "model directory" in capsys.readouterr().err and not rec.exists()


def test_export_ascend_c8_record_of_another_model_refused_before_calibrating(tiny, tmp_path, capsys,  # noqa: F811
                                                                            no_calibration):
    model_dir, corpus = tiny
    rec = tmp_path / "kv.txt"
    write_kv_factors(rec, {"other.layers.0.self_attn.k_proj": ([0.1], [0])})
    before = rec.read_text()
    assert _calibrate(model_dir, corpus, rec, "--symmetric", "--export-ascend-c8", str(tmp_path / "c8")) == 2
    err = capsys.readouterr().err
    assert "already holds 'other.layers.0.self_attn.k_proj'" in err and "another --record" in err
    assert rec.read_text() == before and not (tmp_path / "c8").exists()


@pytest.mark.parametrize("target", ["ascend-c8", "transformers", "vllm-fp8"])
def test_target_with_num_of_bins_is_validated_against_the_targets_algorithm(target):
    from amct_hf.errors import QuantParamsError
    from amct_hf.settings.presets import resolve_kv_settings

    settings = resolve_kv_settings(target, {"num_of_bins": 4096})
    assert settings.params["key"].num_of_bins == settings.params["value"].num_of_bins == 4096
    with pytest.raises(QuantParamsError, match="4097"):
        resolve_kv_settings(target, {"num_of_bins": 4097})


def test_cli_target_with_num_of_bins_calibrates(tiny, tmp_path):  # noqa: F811
    model_dir, corpus = tiny
    rec = tmp_path / "kv.txt"
    assert _calibrate(model_dir, corpus, rec, "--target", "vllm-fp8", "--num-of-bins", "2048") == 0
    assert len(read_kv_factors(rec)) == 4
