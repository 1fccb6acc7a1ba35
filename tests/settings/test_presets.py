"""Targets decide per model family: a Gemma 3 model (read from its config: loaded, or a folder
without loading weights) takes the family's own measured settings, a Llama model the general
ones; explicit arguments that contradict the family's settings are refused naming it."""
import pytest

from amct_hf import calibrate_kv_cache
from amct_hf.calibrate import options_from_keywords, resolve_calibration
from amct_hf.errors import InvalidArgumentError
from amct_hf.settings.presets import (
    FAMILY_TARGETS,
    TARGETS,
    WITHOUT_VALUE_CENTERING,
    model_family,
    resolve_kv_settings,
)

GEMMA3_TARGETS = sorted(FAMILY_TARGETS["gemma3"])


def _expected(spec) -> dict:
    """A target spec as the resolved settings report it."""
    return resolve_kv_settings(None, spec["key"], spec["value"], spec["channel_groups"], spec["range_margin"])


def _same(kv, spec) -> bool:
    want = _expected(spec)
    return kv.params == want.params and kv.groups == want.groups and kv.range_margin == want.range_margin


def test_gemma3_has_settings_of_its_own_that_differ_from_the_general_ones():
    assert GEMMA3_TARGETS  # measured: the general settings do not hold on Gemma 3
    for target in GEMMA3_TARGETS:
        assert not _same(resolve_kv_settings(target), FAMILY_TARGETS["gemma3"][target]), target


def test_the_family_is_read_from_the_config_model_type():
    from transformers import Gemma3Config, Gemma3TextConfig, LlamaConfig, Qwen2Config
    assert model_family(Gemma3TextConfig()) == "gemma3"
    assert model_family(Gemma3Config()) == "gemma3"  # the multimodal wrapper's text model
    assert model_family(LlamaConfig()) is None and model_family(Qwen2Config()) is None
    assert model_family(object()) is None


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_a_gemma3_folder_and_model_take_the_family_settings_and_llama_does_not(target, tiny_gemma3_dir, tiny_dir):
    from transformers import AutoModelForCausalLM
    family_spec = FAMILY_TARGETS["gemma3"].get(target)
    for model in (str(tiny_gemma3_dir), AutoModelForCausalLM.from_pretrained(tiny_gemma3_dir)):
        kv = resolve_calibration(model, **options_from_keywords(target=target)).kv
        if family_spec is None:  # the general settings (no attention biases: no value centring)
            assert kv.family is None and _same(kv, WITHOUT_VALUE_CENTERING.get(target, TARGETS[target]))
        else:
            assert kv.family == "gemma3" and _same(kv, family_spec)
            assert kv.to_dict()["family"] == "gemma3"
    llama = resolve_calibration(str(tiny_dir), **options_from_keywords(target=target)).kv
    assert llama.family is None and _same(llama, TARGETS[target])


@pytest.mark.parametrize("target", GEMMA3_TARGETS)
def test_calibrating_a_tiny_gemma3_uses_the_family_settings(target, tiny_gemma3_dir):
    spec = FAMILY_TARGETS["gemma3"][target]
    res = calibrate_kv_cache(str(tiny_gemma3_dir), str(tiny_gemma3_dir / "corpus.txt"), target=target,
                             write=False, progress=False, num_samples=2, seq_len=16)
    assert res.settings.family == "gemma3" and _same(res.settings, spec)
    for name, (scales, offsets) in res.factors.items():
        kind = "key" if name.endswith("k_proj") else "value"
        per_channel = spec[kind]["quant_granularity"] == "per_channel"
        assert len(scales) == (16 if per_channel else 1), name  # one KV head of 16 dims
        if not spec[kind]["asymmetric"]:
            assert set(offsets) == {0}, name


@pytest.mark.parametrize("target", GEMMA3_TARGETS)
def test_an_argument_against_the_family_settings_is_refused_naming_the_family(target):
    spec = FAMILY_TARGETS["gemma3"][target]
    other = {"key": spec["range_margin"]["key"] + 0.125, "value": spec["range_margin"]["value"]}
    with pytest.raises(InvalidArgumentError, match=rf"target='{target}' \(for gemma3 models\) sets range_margin"):
        resolve_kv_settings(target, range_margin=other, family="gemma3")


def test_an_unknown_family_takes_the_general_settings():
    for target, spec in TARGETS.items():
        kv = resolve_kv_settings(target, family="not-a-family")
        assert kv.family is None and _same(kv, spec)
