"""Calibration data: load texts, tokenize them into samples, batch and shard them.

The pipeline is ``load_texts`` -> ``tokenize_samples`` -> ``shard`` -> ``make_batches``.
Everything that can be wrong with the data (a missing file, split or column, an empty
corpus) raises here, before a model is loaded or run.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import DatasetError, MissingFileError
from ..modeling.loading import looks_like_path
from ..settings.options import check_chat_template_option
from ..settings.validate import positive_int

__all__ = ["load_texts", "tokenize_samples", "leading_bos", "make_batches", "shard", "FILE_BUILDERS",
           "has_chat_template", "use_chat_template",
           "chat_messages", "render_chat"]

logger = logging.getLogger("amct_hf")

# file suffix -> `datasets` packaged builder; .cor is gensim's corpus format (one text a line)
FILE_BUILDERS = {
    ".txt": "text", ".text": "text", ".cor": "text",
    ".json": "json", ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}

# texts are tokenized this many at a time, so a large corpus stops being tokenized as soon
# as enough tokens are collected
_TOKENIZE_CHUNK = 256


# --------------------------------------------------------------------------- loading

def load_texts(dataset: Any, *, split: str = "train", text_column: str = "text",
               cache_dir: str | os.PathLike | None = None, messages: bool = False) -> list:
    """The non-blank texts of ``dataset``, in order.

    ``dataset`` is one of:

    * a ``datasets.Dataset``, or a ``datasets.DatasetDict`` (``split`` is taken from it);
    * a local file (``str``/``Path``): ``.txt``/``.text``/``.cor`` (one text per line),
      ``.json``/``.jsonl``, ``.parquet``, ``.csv``; or a local directory of such files;
    * a list/tuple of strings (used as is) or of paths (their texts, file after file);
    * any other string: a dataset name for ``datasets.load_dataset`` (only datasets already
      in the local cache work offline).

    Blank entries are dropped: the text loader yields one row per line, and blank lines
    only separate paragraphs. ``cache_dir`` is passed to ``datasets.load_dataset``.
    ``messages=True`` also keeps entries that are conversations (a list of
    ``{"role": ..., "content": ...}`` dicts, e.g. a dataset's ``messages`` column), for
    :func:`render_chat`.

    Raises ``FileNotFoundError`` for a path that does not exist, ``ValueError`` for a
    missing split or column, non-string entries, an unknown dataset name or a dataset
    without any text, ``TypeError`` for an unsupported ``dataset`` type.
    """
    import datasets

    if isinstance(dataset, (list, tuple)):
        if dataset and all(isinstance(p, os.PathLike) for p in dataset):
            texts = [t for p in dataset for t in load_texts(
                p, split=split, text_column=text_column, cache_dir=cache_dir, messages=messages)]
            return _check_not_empty(texts, f"list of {len(dataset)} files")
        return _check_not_empty(_clean(dataset, "list entry", messages), f"list of {len(dataset)} texts")

    if isinstance(dataset, datasets.DatasetDict):
        ds, name = _pick_split(dataset, split, "DatasetDict"), f"DatasetDict split {split!r}"
    elif isinstance(dataset, datasets.Dataset):
        ds, name = dataset, "Dataset"
    elif isinstance(dataset, (str, os.PathLike)):
        ds, name = _load_named(dataset, split, cache_dir)
    else:
        raise TypeError(
            f"unsupported dataset type {type(dataset).__name__}: expected a datasets.Dataset/"
            "DatasetDict, a file or directory path, a dataset name or a list of strings")

    if text_column not in ds.column_names:
        raise DatasetError(f"dataset {name} has no column {text_column!r}; "
                         f"columns present: {ds.column_names}")
    texts = _clean(ds[text_column], f"column {text_column!r} of dataset {name}, row", messages)
    return _check_not_empty(texts, name)


def _looks_like_path(s: str) -> bool:
    # a known data-file suffix also means a local file, so a typo gets FileNotFoundError
    # rather than a confusing "not found on the Hub"
    return Path(s).suffix.lower() in FILE_BUILDERS or looks_like_path(s)


def _load_named(dataset: str | os.PathLike, split: str, cache_dir):
    """(Dataset, its name for messages) for a path or a dataset name."""
    import datasets

    cache_dir = os.fspath(cache_dir) if cache_dir is not None else None
    is_path = isinstance(dataset, os.PathLike)
    text = os.fspath(dataset)
    path = Path(text).expanduser()

    if path.is_file():
        if split != "train":
            raise DatasetError(f"split={split!r} does not apply to the file {text}: a single "
                               "data file has only the 'train' split")
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DatasetError(f"unsupported data file type {path.suffix!r} for {text}; "
                             f"expected one of {sorted(FILE_BUILDERS)}")
        # the builders fail with unhelpful errors (StopIteration, DatasetGenerationError)
        # on an empty file; detect it first
        if _blank_file(path) and builder != "parquet":
            raise DatasetError(f"dataset {text} has no text (the file is empty)")
        try:
            # a single file always lands in the builder's "train" split
            ds = datasets.load_dataset(builder, data_files=str(path), split="train",
                                       cache_dir=cache_dir)
        except datasets.exceptions.DatasetGenerationError as err:
            raise DatasetError(f"could not read {text} as {builder}: {err.__cause__ or err}") \
                from err
        except _arrow_errors() as err:  # parquet is read by pyarrow before any generation
            raise DatasetError(f"could not read {text} as {builder}: {err}") from err
        return ds, text

    if path.is_dir():
        try:
            loaded = datasets.load_dataset(str(path), cache_dir=cache_dir)
        except datasets.data_files.EmptyDatasetError as err:
            raise DatasetError(f"dataset {text} has no text (the directory holds no data "
                             f"files: {sorted(FILE_BUILDERS)})") from err
        return _pick_split(loaded, split, text), f"{text} split {split!r}"

    if is_path or _looks_like_path(text):
        raise MissingFileError(f"dataset {text} does not exist")

    try:
        # load all splits and pick one ourselves, so a wrong split gets the same error as
        # for a DatasetDict; split expressions ("train[:100]") go to datasets as they are
        if "[" in split or "+" in split:
            return (datasets.load_dataset(text, split=split, cache_dir=cache_dir),
                    f"{text} split {split!r}")
        loaded = datasets.load_dataset(text, cache_dir=cache_dir)
    except (OSError, datasets.exceptions.DatasetsError) as err:
        # offline, a name not in the local cache is a ConnectionError; online a
        # DatasetNotFoundError: either way the user needs a local file or a cached dataset
        raise DatasetError(
            f"dataset {text!r} could not be found locally or offline (it is not a local "
            f"file or directory, and not in the datasets cache): {err}") from err
    return _pick_split(loaded, split, text), f"{text} split {split!r}"


def _arrow_errors() -> tuple:
    """pyarrow's error types (an empty or corrupt parquet file raises ArrowInvalid)."""
    try:
        import pyarrow
    except ImportError:
        return ()
    return (pyarrow.ArrowException,)


def _pick_split(dataset_dict, split: str, name: str):
    if split not in dataset_dict:
        raise DatasetError(f"dataset {name} has no split {split!r}; "
                         f"available splits: {list(dataset_dict.keys())}")
    return dataset_dict[split]


def _blank_file(path: Path) -> bool:
    # read until the first non-whitespace byte: normally one block, even for a huge file
    with open(path, "rb") as f:
        while block := f.read(1 << 16):
            if block.strip():
                return False
    return True


def _clean(values, what: str, messages: bool = False) -> list:
    texts = []
    for i, v in enumerate(values):
        if messages and isinstance(v, (list, tuple)):
            texts.append(_check_messages(v, f"{what} {i}"))
            continue
        if not isinstance(v, str):
            hint = (" (a conversation: render it with the chat template, --chat-template)"
                    if isinstance(v, (list, tuple)) else "")
            raise DatasetError(f"{what} {i} is {type(v).__name__} ({v!r:.60}), expected a string{hint}")
        if v.strip():
            texts.append(v)
    return texts


def _check_messages(turns, what: str) -> list[dict]:
    for turn in turns:
        if not (isinstance(turn, Mapping) and isinstance(turn.get("role"), str)
                and isinstance(turn.get("content"), str)):
            raise DatasetError(f"{what} is not a conversation: every turn needs a string 'role' and "
                               f"'content', got {turn!r:.80}")
    if not turns:
        raise DatasetError(f"{what} is an empty conversation")
    return [{"role": t["role"], "content": t["content"]} for t in turns]


def _check_not_empty(texts: list[str], name: str) -> list[str]:
    if not texts:
        raise DatasetError(f"dataset {name} has no text (no non-blank entries)")
    return texts


# --------------------------------------------------------------------------- tokenizing

def tokenize_samples(tokenizer, texts: Sequence, *, seq_len: int, num_samples: int,
                     pack: bool = True, chat_template: bool | str = False) -> list[list[int]]:
    """Up to ``num_samples`` token-id lists of at most ``seq_len`` tokens.

    Every sample starts with the tokenizer's BOS token when the tokenizer adds one to every
    input (:func:`leading_bos`), as the model is served; the rest is text.

    ``pack=True`` (default): the texts are tokenized without special tokens, joined into
    one stream with the tokenizer's eos token between documents (if it has one), and cut
    into consecutive chunks of exactly ``seq_len`` tokens. Calibration wants every sample
    full-length with real long-range context -- the usual recipe is 128 x 2048 tokens --
    and no padding, whose positions would only be masked out anyway. The trailing partial
    chunk is dropped, unless no full chunk exists: then the whole (shorter) stream is the
    one sample.

    ``pack=False``: one sample per text, truncated to ``seq_len`` (no special tokens
    either), from the first ``num_samples`` texts with any tokens. Lengths differ; padding
    happens in ``make_batches``.

    ``chat_template`` (True, False or "auto": True when the tokenizer has a template):
    every text is first rendered through the tokenizer's chat template as one
    conversation (:func:`render_chat`), and packing joins the rendered conversations
    without an extra separator (the template ends every turn itself). True with a
    tokenizer that has no template is a one-line ``DatasetError``.

    Fewer samples than asked is logged as a warning on the ``amct_hf`` logger; no tokens
    at all is a ``ValueError``.
    """
    for arg, value in (("seq_len", seq_len), ("num_samples", num_samples)):
        positive_int(arg, value, DatasetError)
    texts = list(texts)
    chat = use_chat_template(tokenizer, chat_template)
    if not chat and any(not isinstance(t, str) for t in texts):
        raise DatasetError("the calibration data holds conversations, which need a chat template, "
                           "and the tokenizer has none (or chat_template=False)")
    render = (lambda chunk: render_chat(tokenizer, chunk)) if chat else (lambda chunk: chunk)

    # a model whose tokenizer starts every input with BOS is served that way, and without it
    # its attention behaves unlike anything it serves (Gemma 3: perplexity 5-10x higher)
    bos = leading_bos(tokenizer)
    if seq_len <= len(bos):
        bos = []
    if pack:
        samples = _pack(tokenizer, texts, seq_len - len(bos), num_samples, render, separate=not chat)
    else:
        samples = []
        for chunk in _chunks(texts):
            enc = _encode(tokenizer, render(chunk), truncation=True, max_length=seq_len - len(bos))
            samples.extend(ids for ids in enc if ids)
            if len(samples) >= num_samples:
                break
        samples = samples[:num_samples]
    samples = [bos + s if s[:1] != bos else s for s in samples]

    if not samples:
        raise DatasetError(f"the {len(texts)} calibration texts produced no tokens")
    if len(samples) < num_samples or (pack and len(samples[0]) < seq_len):
        logger.warning(
            "made %d calibration sample(s) (%s), asked for %d of %d tokens; use more text%s",
            len(samples), _lengths(samples), num_samples, seq_len,
            " or a smaller seq_len" if pack and len(samples[0]) < seq_len else "")
    return samples


def leading_bos(tokenizer) -> list[int]:
    """``[bos_token_id]`` when the tokenizer puts it in front of every input by itself
    (Llama 3, Gemma), else ``[]`` (SmolLM2, Qwen2)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if not isinstance(bos, int):
        return []
    try:
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        without = tokenizer("a", add_special_tokens=False)["input_ids"]
    except Exception:  # a tokenizer that cannot say: leave the text as it is
        return []
    return [bos] if with_special[:1] == [bos] and without[:1] != [bos] else []


def _pack(tokenizer, texts, seq_len, num_samples, render, separate=True) -> list[list[int]]:
    eos = getattr(tokenizer, "eos_token_id", None)
    sep = [eos] if isinstance(eos, int) and separate else []
    need = seq_len * num_samples
    stream: list[int] = []
    for chunk in _chunks(texts):
        for ids in _encode(tokenizer, render(chunk)):
            if not ids:
                continue  # would leave two separators in a row
            if stream:
                stream.extend(sep)
            stream.extend(ids)
        if len(stream) >= need:
            break
    full = len(stream) // seq_len
    if full == 0:
        return [stream] if stream else []
    return [stream[i * seq_len:(i + 1) * seq_len] for i in range(min(full, num_samples))]


def _chunks(texts):
    for i in range(0, len(texts), _TOKENIZE_CHUNK):
        yield texts[i:i + _TOKENIZE_CHUNK]


def _encode(tokenizer, texts, **kwargs) -> list[list[int]]:
    # verbose=False: a document longer than model_max_length is expected here (it gets
    # chunked or truncated), so the tokenizer's "sequence too long" warning is noise
    return tokenizer(texts, add_special_tokens=False, verbose=False, **kwargs)["input_ids"]


def _lengths(samples) -> str:
    lengths = sorted({len(s) for s in samples})
    if len(lengths) == 1:
        return f"{lengths[0]} tokens each" if len(samples) > 1 else f"{lengths[0]} tokens"
    return f"{lengths[0]}..{lengths[-1]} tokens"


# --------------------------------------------------------------------------- chat template

def has_chat_template(tokenizer) -> bool:
    """Whether ``tokenizer`` carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def use_chat_template(tokenizer, chat_template: bool | str) -> bool:
    """Whether texts are rendered through ``tokenizer``'s chat template: the option
    resolved for this tokenizer ("auto": when it has one). True for a tokenizer without
    a template is a one-line ``DatasetError``, raised before any forward pass."""
    check_chat_template_option(chat_template, DatasetError)
    if chat_template == "auto":
        return has_chat_template(tokenizer)
    if chat_template and not has_chat_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DatasetError(f"chat_template=True (--chat-template), but the tokenizer {name} has no chat "
                           "template; calibrate on plain text or use a tokenizer that has one")
    return bool(chat_template)


def chat_messages(text: str) -> list[dict]:
    """One conversation from a plain text: its first half as the user turn, the rest as
    the assistant's reply, split at the whitespace nearest the middle. Every token of the
    text stays in the conversation; the template only adds its role markers (and any
    default system turn of its own). A text without whitespace is the user turn alone,
    with an empty reply."""
    text = text.strip()
    middle = len(text) // 2
    cuts = [i for i, ch in enumerate(text) if ch.isspace()]
    if not cuts:
        return [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
    cut = min(cuts, key=lambda i: (abs(i - middle), i))
    return [{"role": "user", "content": text[:cut].rstrip()},
            {"role": "assistant", "content": text[cut:].strip()}]


def render_chat(tokenizer, texts: Sequence) -> list[str]:
    """Each entry rendered through ``tokenizer``'s chat template: a plain text as one
    user and one assistant turn (:func:`chat_messages`), a conversation (list of
    ``{"role", "content"}`` dicts, e.g. a dataset's ``messages`` column) as it is."""
    if not has_chat_template(tokenizer):
        use_chat_template(tokenizer, True)  # the one-line error
    from jinja2 import TemplateError

    out = []
    for entry in texts:
        messages = chat_messages(entry) if isinstance(entry, str) else list(entry)
        try:
            out.append(tokenizer.apply_chat_template(messages, tokenize=False))
        except TemplateError as err:  # a template's own raise_exception(): role order, missing turns
            raise DatasetError(f"the tokenizer's chat template refused a conversation "
                               f"({' '.join(str(err).split())})") from err
    return out


# --------------------------------------------------------------------------- batching

def make_batches(samples: Sequence[Sequence[int]], *, batch_size: int,
                 pad_token_id: int | None, padding_side: str = "right") -> list[dict]:
    """Consecutive batches of ``batch_size`` samples (the last may be smaller), in order.

    Each is ``{"input_ids": LongTensor[B, L], "attention_mask": LongTensor[B, L]}`` with
    ``L`` the longest sample of that batch; shorter samples are padded with
    ``pad_token_id`` on ``padding_side`` ("right" or "left") and masked with 0.
    ``pad_token_id`` may be None only if no batch needs padding.
    """
    import torch

    positive_int("batch_size", batch_size, DatasetError)
    if padding_side not in ("left", "right"):
        raise DatasetError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    for i, s in enumerate(samples):
        if len(s) == 0:
            raise DatasetError(f"sample {i} is empty; every sample needs at least one token")

    batches = []
    for start in range(0, len(samples), batch_size):
        group = [list(s) for s in samples[start:start + batch_size]]
        length = max(len(s) for s in group)
        if pad_token_id is None and any(len(s) < length for s in group):
            raise DatasetError(
                f"samples {start}..{start + len(group) - 1} have different lengths and need "
                "padding, but pad_token_id is None (use the tokenizer's pad or eos token id)")
        ids = torch.full((len(group), length), pad_token_id if pad_token_id is not None else 0,
                         dtype=torch.long)
        mask = torch.zeros((len(group), length), dtype=torch.long)
        for row, s in enumerate(group):
            cols = slice(0, len(s)) if padding_side == "right" else slice(length - len(s), length)
            ids[row, cols] = torch.tensor(s, dtype=torch.long)
            mask[row, cols] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


# --------------------------------------------------------------------------- sharding

def shard(items: Sequence, rank: int, world_size: int) -> list:
    """The items rank ``rank`` of ``world_size`` processes: one contiguous block.

    Rank r gets ``items[r*c:(r+1)*c]`` with ``c = ceil(n / world_size)``, so trailing
    ranks may get fewer items or none. Contiguous blocks (rather than round-robin) make
    the concatenation of the ranks' results, in rank order, equal the single-process
    order, so order-dependent consumers see the same sequence either way.
    """
    for arg, value in (("world_size", world_size), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise DatasetError(f"{arg} must be an integer, got {value!r}")
    if world_size <= 0:
        raise DatasetError(f"world_size must be positive, got {world_size}")
    if not 0 <= rank < world_size:
        raise DatasetError(f"rank must be in [0, {world_size}), got {rank}")
    items = list(items)
    per_rank = math.ceil(len(items) / world_size)
    return items[rank * per_rank:(rank + 1) * per_rank]
