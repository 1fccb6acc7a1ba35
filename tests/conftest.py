"""Shared fixtures. The suite runs fully offline (SPEC §6): no Hub access, local paths only."""
import os
import sys
from pathlib import Path

# Before anything imports transformers/datasets/huggingface_hub: never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Let `pytest` (not only `python -m pytest`) import the in-tree package without an install.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402

from .tiny_models import build  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct as a float32 HF folder, converted at most once per session
    (~20 s). Set AMCT_HF_CACHE to reuse a persistent cache across sessions."""
    from amct_hf.data.bundled import smollm2_folder

    cache = os.environ.get("AMCT_HF_CACHE") or tmp_path_factory.mktemp("amct_hf_cache")
    return smollm2_folder(cache_dir=cache)


@pytest.fixture(scope="session")
def gemma3_dir(tmp_path_factory):
    """Gemma 3 270M as a float32 HF folder, joined from its GGUF chunks and converted at
    most once per session (~1 min). AMCT_HF_CACHE reuses a persistent cache."""
    from amct_hf.data.bundled import gemma3_folder

    cache = os.environ.get("AMCT_HF_CACHE") or tmp_path_factory.mktemp("amct_hf_cache")
    return gemma3_folder(cache_dir=cache)


WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon phi chi psi omega").split()


def corpus_lines(n=60):
    g = torch.Generator().manual_seed(0)
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(k),), generator=g))
            for k in torch.randint(3, 30, (n,), generator=g)]


def word_tokenizer():
    """A word-level tokenizer fitted on :func:`corpus_lines` ([UNK], [PAD], [EOS] specials)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(corpus_lines(), trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "[EOS]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_llama")
    tok = word_tokenizer()
    tok.save_pretrained(d)
    build("llama").save_pretrained(d)
    (d / "corpus.txt").write_text("\n".join(corpus_lines()) + "\n")
    return d


@pytest.fixture(scope="module")
def tiny_gemma3_dir(tmp_path_factory):
    """A tiny Gemma 3 (interleaved sliding/full layers, one KV head) with the word tokenizer
    and the corpus, as a folder."""
    d = tmp_path_factory.mktemp("tiny_gemma3")
    word_tokenizer().save_pretrained(d)
    build("gemma3").save_pretrained(d)
    (d / "corpus.txt").write_text("\n".join(corpus_lines()) + "\n")
    return d


def pytest_collection_modifyitems(config, items):
    # everything on the real SmolLM2 or Gemma 3 is slow (minutes on 2 cores): `-m "not slow"`
    # skips it
    for item in items:
        if {"smollm2_dir", "gemma3_dir"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
