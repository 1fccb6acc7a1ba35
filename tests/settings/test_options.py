"""The option objects and the one resolution of a calibration's settings."""
import pytest

from amct_hf.calibrate import calibrate_kv_cache, options_from_keywords, resolve_calibration
from amct_hf.errors import InvalidArgumentError
from amct_hf.settings.options import DataOptions, QuantOptions


@pytest.mark.parametrize("field,value,match", [
    ("num_samples", 0, "num_samples must be a positive integer, got 0"),
    ("seq_len", True, "seq_len must be a positive integer, got True"),
    ("batch_size", 1.5, "batch_size must be a positive integer, got 1.5"),
])
def test_data_options_refuse_bad_counts(field, value, match):
    with pytest.raises(InvalidArgumentError, match=match):
        DataOptions(**{field: value})


@pytest.mark.parametrize("kwargs,match", [
    ({"tap": "kv"}, "tap='kv' is not supported"),
    ({"mode": "fast"}, "mode='fast' is not supported"),
    ({"value_centering": "yes"}, "value_centering must be True or False"),
])
def test_quant_options_refuse_bad_values(kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        QuantOptions(**kwargs)


def test_every_keyword_lands_in_exactly_one_option_object():
    options = options_from_keywords(target="vllm-fp8", seq_len=64, dtype="bfloat16", pack=False)
    assert options["quant"].target == "vllm-fp8" and options["data"].seq_len == 64
    assert options["data"].pack is False and options["load"].dtype == "bfloat16"
    assert DataOptions(num_samples=3, seq_len=5).num_tokens == 15


def test_calibrate_kv_cache_resolves_once_and_takes_a_resolved_settings(tiny_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import amct_hf.calibrate as driver
    calls = []
    real = driver.resolve_kv_settings
    monkeypatch.setattr(driver, "resolve_kv_settings", lambda *a, **k: calls.append(a) or real(*a, **k))
    model, tok = AutoModelForCausalLM.from_pretrained(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)
    texts = str(tiny_dir / "corpus.txt")
    first = calibrate_kv_cache(model, texts, tokenizer=tok, target="transformers", num_samples=2, seq_len=16,
                               record_file=tmp_path / "a.txt", progress=False)
    assert len(calls) == 1
    settings = resolve_calibration(model, **options_from_keywords(target="transformers", num_samples=2, seq_len=16,
                                                                  tokenizer=tok))
    assert len(calls) == 2
    second = calibrate_kv_cache(model, texts, settings=settings, record_file=tmp_path / "b.txt", progress=False)
    assert len(calls) == 2  # handed over, not resolved again
    assert second.factors == first.factors and second.settings == settings.kv
    with pytest.raises(InvalidArgumentError, match=r"either settings= or the keywords .*'seq_len'"):
        calibrate_kv_cache(model, texts, settings=settings, seq_len=32, record_file=tmp_path / "c.txt")
