"""`amct-hf calibrate` on a tiny Llama and a word-level tokenizer trained here (fast)."""
import json
import runpy
import sys
from pathlib import Path

import pytest

from amct_hf.cli import build_parser, main, quant_algo_params_from_args
from amct_hf.record.files import read_kv_factors

LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 16
RECIPES = Path(__file__).resolve().parents[1] / "recipes"
WORDS = ("the cat sat on a mat while the dog ran to the park and a bird sang over "
         "green hills near the river where fish swim under old bridges").split()


def _corpus_lines(n=40):
    # deterministic, varied lines: enough tokens for 4 packed samples of 16
    return [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(8 + i % 5)) for i in range(n)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, corpus .txt) for a 2-layer Llama with 2 KV heads of 16 dims."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny_cli")
    lines = _corpus_lines()
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(lines, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[EOS]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]",
                                   unk_token="[UNK]")
    model_dir = root / "model"
    fast.save_pretrained(model_dir)

    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=KV_HEADS * HEAD_DIM * 2,
                         intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=KV_HEADS, max_position_embeddings=64,
                         pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id,
                         bos_token_id=None)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    return model_dir, corpus


def _calibrate(model_dir, dataset, record, *extra):
    return main(["calibrate", "--model", str(model_dir), "--dataset", str(dataset),
                 "--num-samples", "4", "--seq-len", "16", "--record", str(record),
                 "--no-progress", *extra])


def _expected_keys():
    return {f"model.layers.{i}.self_attn.{kv}_proj" for i in range(LAYERS) for kv in "kv"}


def test_calibrate_per_channel(tiny, tmp_path, capsys):
    model_dir, corpus = tiny
    rec = tmp_path / "kv_cache.txt"
    assert _calibrate(model_dir, corpus, rec, "--granularity", "per_channel") == 0
    factors = read_kv_factors(rec)
    assert set(factors) == _expected_keys()
    for scales, offsets in factors.values():
        assert len(scales) == len(offsets) == KV_HEADS * HEAD_DIM
        assert all(s > 0 for s in scales)
    out = capsys.readouterr().out
    assert f"{2 * LAYERS} K/V entries ({LAYERS} attention layers), 4 samples, 64 tokens" in out and str(rec) in out


def test_params_file_merged_with_flag_override(tiny, tmp_path):
    model_dir, corpus = tiny
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"act_algo": "hfmg", "quant_granularity": "per_channel",
                                  "num_of_bins": 1024, "asymmetric": True}))
    argv = ["calibrate", "--params", str(params), "--granularity", "per_tensor", "--symmetric"]
    args = build_parser().parse_args(argv)
    assert quant_algo_params_from_args(args) == {
        "act_algo": "hfmg", "quant_granularity": "per_tensor", "num_of_bins": 1024,
        "asymmetric": False}
    # only given flags appear: nothing is invented for the library to reject
    assert quant_algo_params_from_args(build_parser().parse_args(["calibrate"])) == {}

    rec = tmp_path / "rec.txt"
    assert _calibrate(model_dir, corpus, rec, "--params", str(params),
                      "--granularity", "per_tensor", "--symmetric") == 0
    factors = read_kv_factors(rec)
    assert set(factors) == _expected_keys()
    for scales, offsets in factors.values():
        assert len(scales) == 1 and offsets == [0]  # per-tensor from the flag, symmetric


def _error_line(capsys) -> str:
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("amct-hf calibrate: error:")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("case, expected", [
    ("missing_model", "does not exist"),
    ("unknown_hub_id", "cannot load model 'no-such-org/no-such-model'"),
    ("missing_column", "no column 'nope'"),
    ("empty_dataset", "file is empty"),
    ("seq_len_zero", "--seq-len must be a positive integer, got 0"),
    ("bins_with_ifmr", "['num_of_bins'] = 4096 belongs to HFMG, but act_algo is 'ifmr'"),
    ("missing_params_file", "--params file"),
    ("params_not_object", "must hold a JSON object"),
    ("unparsable_record", "rec.txt"),
])
def test_bad_inputs_give_one_line_error(tiny, tmp_path, capsys, case, expected):
    model_dir, corpus = tiny
    rec = tmp_path / "rec.txt"
    extra = []
    if case == "missing_model":
        model_dir = tmp_path / "no_such_model"
    elif case == "unknown_hub_id":  # offline: neither local nor in the hub cache
        model_dir = "no-such-org/no-such-model"
    elif case == "missing_column":
        corpus = tmp_path / "data.jsonl"
        corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in _corpus_lines(8)))
        extra = ["--text-column", "nope"]
    elif case == "empty_dataset":
        corpus = tmp_path / "empty.txt"
        corpus.write_text("")
    elif case == "seq_len_zero":
        extra = ["--seq-len", "0"]
    elif case == "bins_with_ifmr":
        extra = ["--algo", "ifmr", "--num-of-bins", "4096"]
    elif case == "missing_params_file":
        extra = ["--params", str(tmp_path / "missing.json")]
    elif case == "params_not_object":
        bad = tmp_path / "list.json"
        bad.write_text("[1, 2]")
        extra = ["--params", str(bad)]
    elif case == "unparsable_record":  # RecordFileError is not a ValueError: still one line
        rec.write_text("record { key: \"x\" oops")
    before = rec.read_text() if rec.exists() else None
    assert _calibrate(model_dir, corpus, rec, *extra) == 2
    line = _error_line(capsys)
    assert expected in line, line
    if case == "missing_model":
        assert "no_such_model" in line
    # nothing written on a refused run
    assert (rec.read_text() if rec.exists() else None) == before


# --------------------------------------------------------------------------- recipes

def _run_recipe(name, monkeypatch, *argv):
    # in-process, as `python recipes/<name>.py ...` would run it
    monkeypatch.setattr(sys, "argv", [str(RECIPES / name), *argv])
    return runpy.run_path(str(RECIPES / name), run_name="__main__")


@pytest.mark.parametrize("name", ["llama.py", "qwen.py"])
def test_recipe_defaults_on_tiny_model(tiny, tmp_path, monkeypatch, name):
    model_dir, corpus = tiny
    rec = tmp_path / "rec.txt"
    ns = _run_recipe(name, monkeypatch, "--model", str(model_dir), "--dataset", str(corpus),
                     "--num-samples", "4", "--seq-len", "16", "--record", str(rec))
    assert ns["TARGET"] == "transformers"
    factors = read_kv_factors(rec)  # the target's: one asymmetric range per tensor
    assert set(factors) == _expected_keys()
    assert all(len(scales) == 1 for scales, _ in factors.values())
    assert any(o != [0] for _, o in factors.values())


def test_recipe_quantization_flags_replace_its_target(tiny, tmp_path, monkeypatch):
    model_dir, corpus = tiny
    rec = tmp_path / "rec.txt"
    with pytest.raises(SystemExit) as exc:
        _run_recipe("llama.py", monkeypatch, "--model", str(model_dir), "--dataset", str(corpus),
                    "--num-samples", "4", "--seq-len", "16", "--record", str(rec),
                    "--algo", "ifmr", "--granularity", "per_channel")
        raise SystemExit(0)
    assert exc.value.code == 0
    assert all(len(scales) == KV_HEADS * HEAD_DIM for scales, _ in read_kv_factors(rec).values())


@pytest.mark.parametrize("name", ["llama.py", "qwen.py"])
def test_recipe_target_replaces_the_recipe_quantization(tiny, tmp_path, monkeypatch, capsys, name):
    model_dir, corpus = tiny
    rec = tmp_path / "rec.txt"
    common = ("--model", str(model_dir), "--dataset", str(corpus), "--num-samples", "4", "--seq-len", "16")
    with pytest.raises(SystemExit) as exc:  # the recipe's __main__ exits only on failure
        _run_recipe(name, monkeypatch, *common, "--record", str(rec), "--target", "ascend-c8")
        raise SystemExit(0)
    assert exc.value.code == 0
    factors = read_kv_factors(rec)  # the target's: HFMG per tensor, symmetric keys (a Llama: centred values)
    assert all(len(s) == 1 for s, _ in factors.values())
    assert all(o == [0] for n, (_, o) in factors.items() if n.endswith("k_proj"))
    with pytest.raises(SystemExit) as exc:  # an explicit --params must still agree with the target
        _run_recipe(name, monkeypatch, *common, "--record", str(tmp_path / "x.txt"), "--target", "ascend-c8",
                    "--param", '{"act_algo": "ifmr"}')  # abbreviated, as argparse allows
    assert exc.value.code == 2 and "act_algo" in capsys.readouterr().err
    assert not (tmp_path / "x.txt").exists()


def test_qwen_recipe_needs_a_model(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exc:
        _run_recipe("qwen.py", monkeypatch, "--num-samples", "4")
    assert exc.value.code == 2
    assert "no model given" in capsys.readouterr().err


def test_cli_exports_lmdeploy_and_refuses_model_formats_without_model(tiny, tmp_path, capsys):
    model_dir, corpus = tiny
    rec = tmp_path / "kv.txt"
    assert _calibrate(model_dir, corpus, rec, "--symmetric") == 0
    out = tmp_path / "lmdeploy.txt"
    assert main(["export", "--record", str(rec), "--format", "lmdeploy-ascend", "--out", str(out)]) == 0
    assert out.read_text().count("kv_cache_value") == 2 * LAYERS
    capsys.readouterr()
    assert main(["export", "--record", str(rec), "--format", "ascend-c8", "--out", str(tmp_path / "d")]) == 2
    assert "pass --model MODEL_DIR" in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_calibrate_then_export_ascend_c8_in_one_go(tiny, tmp_path, capsys):
    model_dir, corpus = tiny
    out = tmp_path / "c8"
    rec = tmp_path / "kv.txt"
    assert _calibrate(model_dir, corpus, rec, "--granularity", "per_channel") == 0  # asymmetric
    capsys.readouterr()
    assert _calibrate(model_dir, corpus, tmp_path / "kv2.txt", "--export-ascend-c8", str(out)) == 2
    assert "needs symmetric keys" in capsys.readouterr().err and not out.exists()
    assert _calibrate(model_dir, corpus, rec, "--granularity", "per_channel", "--symmetric",
                      "--export-ascend-c8", str(out)) == 0
    desc = json.loads((out / "quant_model_description.json").read_text())
    assert desc["kv_cache_type"] == "C8"
    assert sum(v == "C8" for k, v in desc.items() if k.endswith(("kv_cache_scale", "kv_cache_offset"))) \
        == 4 * LAYERS
    assert f"vllm serve {out} --quantization ascend" in capsys.readouterr().out


def test_rerun_into_the_same_record_is_quiet(tiny, tmp_path, capsys):
    model_dir, corpus = tiny
    rec = tmp_path / "kv.txt"
    assert _calibrate(model_dir, corpus, rec) == 0
    capsys.readouterr()
    assert _calibrate(model_dir, corpus, rec) == 0  # same data, same factors: nothing to say
    assert "warning" not in capsys.readouterr().err.lower()
    assert _calibrate(model_dir, corpus, rec, "--algo", "ifmr") == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(err) == 1 and err[0].startswith("amct-hf: warning: record ") and "overwritten" in err[0]


def test_placement_flags_reach_the_loader(tiny, tmp_path, capsys):
    model_dir, corpus = tiny
    assert _calibrate(model_dir, corpus, tmp_path / "kv.txt", "--max-memory", "cpu=lots") == 2
    assert "lots" in capsys.readouterr().err
    rec = tmp_path / "offloaded.txt"
    assert _calibrate(model_dir, corpus, rec, "--max-memory", "cpu=2GiB",
                      "--offload-folder", str(tmp_path / "off")) == 0
    assert (tmp_path / "off").is_dir() and len(read_kv_factors(rec)) == 2 * LAYERS


def test_target_flag_picks_the_engine_configuration(tiny, tmp_path, capsys):
    model_dir, corpus = tiny
    out = tmp_path / "c8"
    rec = tmp_path / "kv.txt"
    assert _calibrate(model_dir, corpus, rec, "--target", "ascend-c8", "--export-ascend-c8", str(out)) == 0
    factors = read_kv_factors(rec)
    assert all(o == [0] for n, (_, o) in factors.items() if n.endswith("k_proj"))  # symmetric keys
    assert any(o != [0] for n, (_, o) in factors.items() if n.endswith("v_proj"))  # centred values ...
    assert json.loads((out / "config.json").read_text())["attention_bias"] is True  # ... folded into biases
    assert "value offsets folded into the attention biases" in capsys.readouterr().out
    assert (out / "quant_model_description.json").is_file()
    assert _calibrate(model_dir, corpus, tmp_path / "sym.txt", "--target", "ascend-c8", "--no-value-centering") == 0
    sym = read_kv_factors(tmp_path / "sym.txt")  # for an engine that ignores attention biases
    assert all(set(o) == {0} for _, o in sym.values())
    assert {len(s) for n, (s, _) in sym.items() if n.endswith("v_proj")} == {32}
    capsys.readouterr()
    assert _calibrate(model_dir, corpus, tmp_path / "y.txt", "--no-value-centering") == 2
    assert "--target ascend-c8 only" in capsys.readouterr().err and not (tmp_path / "y.txt").exists()
    capsys.readouterr()
    assert _calibrate(model_dir, corpus, tmp_path / "x.txt", "--target", "vllm-fp8",
                      "--granularity", "per_channel") == 2
    err = capsys.readouterr().err
    assert "vllm-fp8" in err and not (tmp_path / "x.txt").exists()


def _count_resolutions(monkeypatch):
    import amct_hf.calibrate as driver
    calls = []
    real = driver.resolve_kv_settings

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)
    monkeypatch.setattr(driver, "resolve_kv_settings", counting)
    return calls


def test_calibrate_resolves_its_settings_once_and_defaults_to_the_transformers_target(
        tiny, tmp_path, capsys, monkeypatch):
    model_dir, corpus = tiny
    calls = _count_resolutions(monkeypatch)
    assert _calibrate(model_dir, corpus, tmp_path / "kv.txt") == 0
    assert len(calls) == 1
    out = capsys.readouterr().out
    assert "settings: target transformers (keys HFMG per-tensor asymmetric; values HFMG per-tensor asymmetric)" in out
    # AMCT's own defaults are one flag away, and then no target is named
    assert _calibrate(model_dir, corpus, tmp_path / "kv_amct.txt", "--algo", "ifmr") == 0
    assert len(calls) == 2
    assert "settings: explicit parameters (keys IFMR per-tensor asymmetric; " in capsys.readouterr().out


def test_the_settings_line_names_the_family_settings_a_target_took(tiny, tiny_gemma3_dir, tmp_path, capsys):
    from amct_hf.settings.presets import FAMILY_TARGETS
    target = sorted(FAMILY_TARGETS["gemma3"])[0]
    assert main(["calibrate", "--model", str(tiny_gemma3_dir), "--dataset", str(tiny_gemma3_dir / "corpus.txt"),
                 "--num-samples", "2", "--seq-len", "16", "--record", str(tmp_path / "gemma3.txt"),
                 "--no-progress", "--target", target]) == 0
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("settings: "))
    assert line.startswith(f"settings: target {target}, gemma3 settings (keys ")
    model_dir, corpus = tiny  # Llama: the target's general settings, no family named
    assert _calibrate(model_dir, corpus, tmp_path / "llama.txt", "--target", target) == 0
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("settings: "))
    assert line.startswith(f"settings: target {target} (keys ") and "gemma3" not in line
