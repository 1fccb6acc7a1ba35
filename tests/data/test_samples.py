"""amct_hf.data.samples: loading calibration texts, packing, batching, sharding.

Real files in tmp_path, the real ``datasets`` loaders, and a real fast tokenizer trained
here on a few sentences (no hub access)."""
import json
import logging
from pathlib import Path

import datasets
import pytest
import torch

from amct_hf.data.samples import load_texts, make_batches, shard, tokenize_samples
from amct_hf.errors import DatasetError

SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "the bird flew over the tree",
    "quantization keeps the key and value cache small",
]


@pytest.fixture
def cache(tmp_path):
    # keep the datasets cache inside the test's tmp dir, not ~/.cache
    return tmp_path / "hf_cache"


def _train_tokenizer(eos=True):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "</s>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=specials))
    kwargs = dict(unk_token="<unk>", pad_token="<pad>")
    if eos:
        kwargs["eos_token"] = "</s>"
    # a small model_max_length: long documents must not trigger the "too long" warning
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=8, **kwargs)


@pytest.fixture(scope="module")
def tokenizer():
    return _train_tokenizer()


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------- load_texts

def test_dataset_and_datasetdict():
    ds = datasets.Dataset.from_dict({"text": ["a", "", "b", "  \n"], "n": [1, 2, 3, 4]})
    assert load_texts(ds) == ["a", "b"]
    dd = datasets.DatasetDict({"train": ds, "validation": datasets.Dataset.from_dict(
        {"text": ["v"], "n": [0]})})
    assert load_texts(dd) == ["a", "b"]
    assert load_texts(dd, split="validation") == ["v"]
    with pytest.raises(ValueError, match=r"'test'.*\['train', 'validation'\]"):
        load_texts(dd, split="test")


def test_text_files_drop_blank_lines(tmp_path, cache):
    body = "first line\n\nsecond line\n   \nthird line\n"
    for suffix in (".txt", ".text", ".cor"):
        path = tmp_path / f"corpus{suffix}"
        path.write_text(body)
        assert load_texts(path, cache_dir=cache) == ["first line", "second line", "third line"]
    # a plain str path works as well; a file has one split, so asking for another is an error
    assert load_texts(str(tmp_path / "corpus.txt"), cache_dir=cache)[0] == "first line"
    with pytest.raises(DatasetError, match="split='validation' does not apply to the file"):
        load_texts(str(tmp_path / "corpus.txt"), split="validation", cache_dir=cache)


def test_jsonl_custom_column(tmp_path, cache):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": i, "body": t}) + "\n"
                            for i, t in enumerate(["doc one", "", "doc two"])))
    assert load_texts(path, text_column="body", cache_dir=cache) == ["doc one", "doc two"]
    with pytest.raises(ValueError, match=r"'text'.*\['id', 'body'\]"):
        load_texts(path, cache_dir=cache)


def test_json_parquet_csv(tmp_path, cache):
    ds = datasets.Dataset.from_dict({"text": ["p1", "p2", "p3"]})
    ds.to_parquet(str(tmp_path / "d.parquet"))
    assert load_texts(tmp_path / "d.parquet", cache_dir=cache) == ["p1", "p2", "p3"]
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    assert load_texts(tmp_path / "d.csv", cache_dir=cache) == ["p1", "p2", "p3"]
    (tmp_path / "d.json").write_text(json.dumps([{"text": "j1"}, {"text": "j2"}]))
    assert load_texts(tmp_path / "d.json", cache_dir=cache) == ["j1", "j2"]


def test_directory(tmp_path, cache):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("alpha\n\nbeta\n")
    assert load_texts(folder, cache_dir=cache) == ["alpha", "beta"]
    with pytest.raises(ValueError, match=r"'validation'.*\['train'\]"):
        load_texts(folder, split="validation", cache_dir=cache)


def test_lists(tmp_path, cache):
    assert load_texts(["x", " ", "y"]) == ["x", "y"]
    assert load_texts(("x", "y")) == ["x", "y"]
    (tmp_path / "a.txt").write_text("a1\na2\n")
    (tmp_path / "b.txt").write_text("b1\n")
    assert load_texts([tmp_path / "a.txt", tmp_path / "b.txt"], cache_dir=cache) \
        == ["a1", "a2", "b1"]


def test_non_string_entries():
    with pytest.raises(ValueError, match=r"list entry 1 is int"):
        load_texts(["ok", 3])
    ds = datasets.Dataset.from_dict({"body": ["ok", None]})
    with pytest.raises(ValueError, match=r"'body'.*row 1 is NoneType"):
        load_texts(ds, text_column="body")
    ds = datasets.Dataset.from_dict({"text": [[1, 2], [3]]})
    with pytest.raises(ValueError, match=r"row 0 is list"):
        load_texts(ds)


@pytest.mark.parametrize("name, content", [
    ("empty.txt", ""), ("blank.txt", "\n  \n\n"), ("empty.jsonl", ""), ("empty.csv", ""),
    ("blank.jsonl", json.dumps({"text": "  "}) + "\n")])
def test_empty_files(tmp_path, cache, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=rf"dataset .*{name} has no text"):
        load_texts(tmp_path / name, cache_dir=cache)


def test_empty_in_memory_and_directory(tmp_path, cache):
    with pytest.raises(ValueError, match="has no text"):
        load_texts([])
    with pytest.raises(ValueError, match="has no text"):
        load_texts(datasets.Dataset.from_dict({"text": []}))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="empty_dir has no text"):
        load_texts(tmp_path / "empty_dir", cache_dir=cache)


def test_missing_paths(tmp_path, cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for missing in (tmp_path / "nope.txt", str(tmp_path / "nope"), "nope.jsonl",
                    "data/sub/corpus", "./corpus", Path("corpus")):
        with pytest.raises(FileNotFoundError, match=str(missing).replace(".", r"\.")):
            load_texts(missing, cache_dir=cache)


def test_unknown_dataset_name_offline(tmp_path, cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("amct_hf_no_such_dataset", "amct-hf/no_such_dataset"):
        with pytest.raises(ValueError, match=rf"'{name}' could not be found locally or offline"):
            load_texts(name, cache_dir=cache)


def test_unsupported_inputs(tmp_path):
    (tmp_path / "notes.md").write_text("hello\n")
    with pytest.raises(ValueError, match=r"'\.md'.*notes\.md"):
        load_texts(tmp_path / "notes.md")
    with pytest.raises(TypeError, match="int"):
        load_texts(42)


# --------------------------------------------------------------------------- tokenize

def test_pack_exact_chunks_with_eos_between_documents(tokenizer):
    eos = tokenizer.eos_token_id
    stream = _ids(tokenizer, SENTENCES[0])
    for s in SENTENCES[1:]:
        stream += [eos] + _ids(tokenizer, s)
    assert len(stream) == 6 + 1 + 6 + 1 + 6 + 1 + 8
    samples = tokenize_samples(tokenizer, SENTENCES, seq_len=5, num_samples=4)
    assert samples == [stream[i:i + 5] for i in range(0, 20, 5)]
    assert all(len(s) == 5 for s in samples)
    # the separator sits exactly where the first document ends
    assert samples[1][1] == eos and samples[0] + samples[1][:1] == _ids(tokenizer, SENTENCES[0])
    assert eos not in _ids(tokenizer, " ".join(SENTENCES))


def test_pack_stops_at_num_samples_and_is_default(tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="amct_hf"):
        samples = tokenize_samples(tokenizer, SENTENCES * 50, seq_len=7, num_samples=3)
    assert len(samples) == 3 and all(len(s) == 7 for s in samples)
    assert not caplog.records  # also no "sequence too long" warning from the tokenizer


def test_pack_fewer_chunks_warns(tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="amct_hf"):
        samples = tokenize_samples(tokenizer, SENTENCES, seq_len=9, num_samples=8)
    assert [len(s) for s in samples] == [9, 9, 9]  # 29-token stream, 2-token tail dropped
    assert "made 3 calibration sample(s)" in caplog.text and "asked for 8" in caplog.text


def test_pack_short_stream_is_one_sample(tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="amct_hf"):
        samples = tokenize_samples(tokenizer, SENTENCES[:2], seq_len=64, num_samples=1)
    assert samples == [_ids(tokenizer, SENTENCES[0]) + [tokenizer.eos_token_id]
                       + _ids(tokenizer, SENTENCES[1])]
    assert "made 1 calibration sample(s) (13 tokens)" in caplog.text


def test_pack_without_eos_token():
    tok = _train_tokenizer(eos=False)
    assert tok.eos_token_id is None
    samples = tokenize_samples(tok, SENTENCES[:2], seq_len=12, num_samples=1)
    assert samples == [_ids(tok, SENTENCES[0]) + _ids(tok, SENTENCES[1])]


def test_unpacked_truncates_per_text(tokenizer, caplog):
    texts = [SENTENCES[3], "", SENTENCES[0], SENTENCES[1], SENTENCES[2]]
    samples = tokenize_samples(tokenizer, texts, seq_len=7, num_samples=3, pack=False)
    assert samples == [_ids(tokenizer, SENTENCES[3])[:7], _ids(tokenizer, SENTENCES[0]),
                       _ids(tokenizer, SENTENCES[1])]
    assert [len(s) for s in samples] == [7, 6, 6]
    with caplog.at_level(logging.WARNING, logger="amct_hf"):
        assert len(tokenize_samples(tokenizer, texts, seq_len=7, num_samples=9,
                                    pack=False)) == 4
    assert "asked for 9" in caplog.text


@pytest.mark.parametrize("arg, value", [("seq_len", 0), ("seq_len", -3), ("num_samples", 0),
                                        ("num_samples", -1)])
def test_tokenize_rejects_nonpositive(tokenizer, arg, value):
    kwargs = {"seq_len": 8, "num_samples": 2, arg: value}
    with pytest.raises(ValueError, match=rf"{arg} must be a positive integer, got {value}"):
        tokenize_samples(tokenizer, SENTENCES, **kwargs)


def test_tokenize_no_tokens(tokenizer):
    with pytest.raises(ValueError, match="no tokens"):
        tokenize_samples(tokenizer, [], seq_len=4, num_samples=1)


# --------------------------------------------------------------------------- batches

SAMPLES = [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10], [11]]


def test_batches_right_padding():
    batches = make_batches(SAMPLES, batch_size=2, pad_token_id=0)
    assert [b["input_ids"].tolist() for b in batches] == [
        [[1, 2, 3], [4, 0, 0]], [[5, 6, 0, 0], [7, 8, 9, 10]], [[11]]]
    assert [b["attention_mask"].tolist() for b in batches] == [
        [[1, 1, 1], [1, 0, 0]], [[1, 1, 0, 0], [1, 1, 1, 1]], [[1]]]
    assert all(b["input_ids"].dtype == torch.long and b["attention_mask"].dtype == torch.long
               for b in batches)


def test_batches_left_padding():
    batches = make_batches(SAMPLES, batch_size=3, pad_token_id=99, padding_side="left")
    assert batches[0]["input_ids"].tolist() == [[1, 2, 3], [99, 99, 4], [99, 5, 6]]
    assert batches[0]["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert batches[1]["input_ids"].tolist() == [[7, 8, 9, 10], [99, 99, 99, 11]]
    assert batches[1]["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 0, 1]]
    # order kept: real tokens, read back in order, are the samples
    flat = [ids[m.bool()].tolist() for b in batches
            for ids, m in zip(b["input_ids"], b["attention_mask"])]
    assert flat == SAMPLES


def test_batches_errors():
    for bad in (0, -2):
        with pytest.raises(ValueError, match=rf"batch_size .* got {bad}"):
            make_batches(SAMPLES, batch_size=bad, pad_token_id=0)
    with pytest.raises(ValueError, match="padding_side .* 'center'"):
        make_batches(SAMPLES, batch_size=2, pad_token_id=0, padding_side="center")
    with pytest.raises(ValueError, match="pad_token_id is None"):
        make_batches(SAMPLES, batch_size=2, pad_token_id=None)
    with pytest.raises(ValueError, match="sample 1 is empty"):
        make_batches([[1], []], batch_size=2, pad_token_id=0)
    # equal lengths need no pad token
    assert make_batches([[1, 2], [3, 4]], batch_size=2, pad_token_id=None)[0][
        "input_ids"].tolist() == [[1, 2], [3, 4]]
    assert make_batches([], batch_size=2, pad_token_id=0) == []


# --------------------------------------------------------------------------- shard

@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 7, 10])
def test_shard_covers_all_items_in_order(world_size, n):
    items = [f"item{i}" for i in range(n)]
    shards = [shard(items, r, world_size) for r in range(world_size)]
    assert [x for s in shards for x in s] == items
    per_rank = -(-n // world_size)
    assert all(len(s) <= per_rank for s in shards)
    # the full blocks come first: sizes never increase with rank
    assert [len(s) for s in shards] == sorted((len(s) for s in shards), reverse=True)


def test_shard_uneven_and_empty():
    assert [shard(range(5), r, 4) for r in range(4)] == [[0, 1], [2, 3], [4], []]
    assert [shard(range(2), r, 3) for r in range(3)] == [[0], [1], []]


def test_shard_errors():
    with pytest.raises(ValueError, match="world_size must be positive, got 0"):
        shard([1], 0, 0)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got 2"):
        shard([1], 2, 2)
    with pytest.raises(ValueError, match="rank must be in .* got -1"):
        shard([1], -1, 2)


def _bos_tokenizer():
    """A word-level tokenizer that, like Llama 3's and Gemma's, starts every input with BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "</s>", "<s>"]))
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
                                   bos_token="<s>", model_max_length=8)


@pytest.mark.parametrize("pack", [True, False])
def test_samples_start_with_bos_when_the_tokenizer_adds_one(pack):
    from amct_hf.data.samples import leading_bos
    tok = _bos_tokenizer()
    bos = tok.bos_token_id
    assert leading_bos(tok) == [bos]
    samples = tokenize_samples(tok, SENTENCES * 4, seq_len=6, num_samples=3, pack=pack)
    assert len(samples) == 3
    assert all(s[0] == bos and bos not in s[1:] and len(s) <= 6 for s in samples)
    if pack:  # still full length: BOS then seq_len - 1 text tokens, consecutive in the stream
        assert all(len(s) == 6 for s in samples)
        plain = tokenize_samples(_train_tokenizer(), SENTENCES * 4, seq_len=5, num_samples=3)
        assert len(plain[0]) == 5


def test_no_bos_is_added_for_a_tokenizer_that_adds_none():
    from amct_hf.data.samples import leading_bos
    tok = _train_tokenizer()
    assert leading_bos(tok) == []
    samples = tokenize_samples(tok, SENTENCES * 4, seq_len=6, num_samples=2)
    first = tok(SENTENCES[0], add_special_tokens=False)["input_ids"]
    assert all(len(s) == 6 for s in samples) and samples[0][:min(6, len(first))] == first[:6]
