"""max_memory / offload_folder: parsing, checking, and a real disk-offloaded calibration."""
import pytest

from amct_hf import calibrate_kv_cache
from amct_hf.errors import AmctHfError, ModelLoadError
from amct_hf.modeling.placement import check_max_memory, offload_kwargs, parse_max_memory


def test_cli_form_parses_to_the_from_pretrained_dict():
    assert parse_max_memory("cpu=2GiB,0=20GiB") == {"cpu": "2GiB", 0: "20GiB"}
    assert parse_max_memory(" CPU = 500MB , disk=10GB,1=1024") == {"cpu": "500MB", "disk": "10GB", 1: 1024}


@pytest.mark.parametrize("text,match", [
    ("", "DEVICE=SIZE"),
    ("cpu", "'cpu' is not DEVICE=SIZE"),
    ("cpu=", "not DEVICE=SIZE"),
    ("gpu0=2GiB", "unknown device 'gpu0'"),
    ("cpu=2 parsecs", "not a size"),
    ("cpu=1GiB,cpu=2GiB", "given twice"),
    ("0=1GiB,-1=2GiB", "unknown device '-1'"),
])
def test_bad_cli_form_is_named(text, match):
    with pytest.raises(ModelLoadError, match=match):
        parse_max_memory(text)


@pytest.mark.parametrize("value,match", [
    ({}, "non-empty dict"),
    ("cpu=2GiB", "non-empty dict"),
    ({"cpu": 2.5}, r"max_memory\['cpu'\] = 2.5"),
    ({"cpu": -1}, "negative"),
    ({-2: "1GiB"}, "negative"),
    ({True: "1GiB"}, "not a device"),
    ({0: "1GiB", "0": "2GiB"}, "given twice"),
])
def test_bad_max_memory_is_named(value, match):
    with pytest.raises(ModelLoadError, match=match):
        check_max_memory(value)


def test_offload_arguments_imply_auto_map_and_create_the_folder(tmp_path):
    folder = tmp_path / "a" / "offload"
    kw = offload_kwargs(None, {"cpu": "300MB"}, folder)
    assert kw == {"device_map": "auto", "max_memory": {"cpu": "300MB"}, "offload_folder": str(folder)}
    assert folder.is_dir()
    assert offload_kwargs({"": "cpu"}, None, None) == {"device_map": {"": "cpu"}}
    assert offload_kwargs() == {}
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelLoadError, match="not a directory"):
        offload_kwargs(None, None, tmp_path / "file")


def test_bad_max_memory_fails_before_the_dataset_is_read(tmp_path):
    # the dataset path does not exist either: the max_memory error must come first
    with pytest.raises(AmctHfError, match="unknown device 'gpu'"):
        calibrate_kv_cache("/nonexistent/model", str(tmp_path / "missing.txt"), max_memory={"gpu": "1GiB"},
                           record_file=tmp_path / "x.txt", progress=False)
    assert not (tmp_path / "x.txt").exists()


def test_loaded_model_refuses_placement_arguments(tmp_path):
    from ..tiny_models import build
    with pytest.raises(ValueError, match="already loaded"):
        calibrate_kv_cache(build("llama"), ["a b c"], tokenizer=object(), max_memory={"cpu": "1GiB"},
                           record_file=tmp_path / "x.txt", num_samples=1, seq_len=2, progress=False)


def test_disk_offloaded_smollm2_gives_the_in_memory_factors(smollm2_dir, tmp_path, monkeypatch):
    """SmolLM2 (540 MB fp32) with 300 MB of CPU memory: about 12 decoder layers fit, the others stay on disk and
    are streamed in at every forward; the factors must not change."""
    from transformers import AutoModelForCausalLM

    from amct_hf.data.bundled import news_corpus_path
    kw = dict(quant_algo_params={"act_algo": "hfmg", "quant_granularity": "per_channel"}, num_samples=2,
              seq_len=32, progress=False, write=False)
    in_memory = calibrate_kv_cache(str(smollm2_dir), str(news_corpus_path()), **kw).factors

    placed = []
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        placed.append({**kwargs, "max_memory": dict(kwargs["max_memory"])})  # as asked: loading converts it
        model = original(*args, **kwargs)
        placed.append(dict(model.hf_device_map))
        return model
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    folder = tmp_path / "offload"
    limit = {"cpu": "300MB"}
    offloaded = calibrate_kv_cache(str(smollm2_dir), str(news_corpus_path()), max_memory=limit,
                                   offload_folder=folder, **kw).factors
    assert limit == {"cpu": "300MB"}  # the caller's dict is not modified
    asked, device_map = placed
    assert asked["device_map"] == "auto" and asked["max_memory"] == {"cpu": "300MB"}
    assert asked["offload_folder"] == str(folder) and folder.is_dir()
    on_disk = [name for name, where in device_map.items() if where == "disk"]
    # really split: the first layers in memory, the rest streamed from disk at every forward
    assert device_map["model.layers.0"] == "cpu" and len(on_disk) >= 10, device_map
    assert len(offloaded) == 60 and offloaded == in_memory
