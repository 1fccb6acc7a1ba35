"""Chat-formatted calibration text: rendering through the tokenizer's chat template,
packing of the rendered text, and the refusal of a tokenizer without a template.

The real SmolLM2-135M-Instruct tokenizer (its own template) loads from the converted
folder in about a second once the bundled model has been converted; these tests need
only the tokenizer, not the model."""
import datasets
import pytest
import torch

from amct_hf import calibrate_kv_cache
from amct_hf.cli import main
from amct_hf.data.samples import (
    chat_messages,
    has_chat_template,
    load_texts,
    render_chat,
    tokenize_samples,
    use_chat_template,
)
from amct_hf.errors import DatasetError, InvalidArgumentError
from amct_hf.settings.options import DataOptions

NEWS = ("The council approved the budget on Tuesday after a long debate about roads, schools and "
        "the new hospital wing, which the mayor called the most important project of the decade.")


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from amct_hf.data.bundled import smollm2_folder
    return AutoTokenizer.from_pretrained(smollm2_folder())


@pytest.fixture(scope="module")
def plain_tokenizer(tiny_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert not has_chat_template(tok)
    return tok


def test_chat_messages_split_a_text_in_two_turns():
    user, assistant = chat_messages("  one two three four five six  ")
    assert (user["role"], assistant["role"]) == ("user", "assistant")
    assert f"{user['content']} {assistant['content']}" == "one two three four five six"
    assert abs(len(user["content"]) - len(assistant["content"])) <= 4  # split near the middle
    assert chat_messages("single") == [{"role": "user", "content": "single"},
                                       {"role": "assistant", "content": ""}]


def test_smollm2_template_renders_role_markers(smollm2_tokenizer):
    assert has_chat_template(smollm2_tokenizer)
    assert use_chat_template(smollm2_tokenizer, "auto") is True
    [rendered] = render_chat(smollm2_tokenizer, [NEWS])
    user, assistant = chat_messages(NEWS)
    assert f"<|im_start|>user\n{user['content']}<|im_end|>" in rendered
    assert f"<|im_start|>assistant\n{assistant['content']}<|im_end|>" in rendered
    assert rendered.index("<|im_start|>user") < rendered.index("<|im_start|>assistant")


def test_smollm2_chat_packing_gives_full_length_samples(smollm2_tokenizer):
    tok = smollm2_tokenizer
    texts = [f"{NEWS} Story number {i} ends here." for i in range(40)]
    plain = tokenize_samples(tok, texts, seq_len=96, num_samples=5)
    chat = tokenize_samples(tok, texts, seq_len=96, num_samples=5, chat_template=True)
    assert [len(s) for s in chat] == [96] * 5
    assert chat != plain
    start = tok.convert_tokens_to_ids("<|im_start|>")
    stream = [t for s in chat for t in s]
    assert stream.count(start) >= 5  # role markers all through the packed stream
    decoded = tok.decode(stream)
    assert "<|im_start|>user\n" in decoded and "<|im_start|>assistant\n" in decoded
    # the rendered conversations end their own turns: no extra EOS between conversations
    assert "<|im_end|><|im_end|>" not in decoded
    # "auto" is the template for this tokenizer
    assert tokenize_samples(tok, texts, seq_len=96, num_samples=5, chat_template="auto") == chat


def test_messages_column_is_rendered_as_is(smollm2_tokenizer):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."}]
    ds = datasets.Dataset.from_dict({"messages": [conv, conv]})
    texts = load_texts(ds, text_column="messages", messages=True)
    assert texts == [conv, conv]
    [rendered] = render_chat(smollm2_tokenizer, texts[:1])
    assert rendered == smollm2_tokenizer.apply_chat_template(conv, tokenize=False)
    assert "You are a helpful AI assistant" not in rendered  # the dataset's own system turn
    with pytest.raises(DatasetError, match="conversation.*--chat-template"):
        load_texts(ds, text_column="messages")
    with pytest.raises(DatasetError, match="'role' and 'content'"):
        load_texts([[{"role": "user"}]], messages=True)


def test_tokenizer_without_template_is_refused(plain_tokenizer):
    with pytest.raises(DatasetError, match="has no chat template") as err:
        tokenize_samples(plain_tokenizer, ["alpha beta gamma"] * 10, seq_len=4, num_samples=2, chat_template=True)
    assert "\n" not in str(err.value)
    # "auto" falls back to plain text for it
    texts = ["alpha beta gamma delta"] * 10
    assert tokenize_samples(plain_tokenizer, texts, seq_len=4, num_samples=2, chat_template="auto") == \
        tokenize_samples(plain_tokenizer, texts, seq_len=4, num_samples=2)


def test_calibrate_refuses_before_any_forward(tiny_dir, plain_tokenizer):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(DatasetError, match="has no chat template"):
        calibrate_kv_cache(model, str(tiny_dir / "corpus.txt"), tokenizer=plain_tokenizer, chat_template=True,
                           num_samples=2, seq_len=8, progress=False, write=False)
    assert calls == []


def test_cli_flag_error_is_one_line(tiny_dir, tmp_path, capsys):
    rc = main(["calibrate", "--model", str(tiny_dir), "--dataset", str(tiny_dir / "corpus.txt"),
               "--num-samples", "2", "--seq-len", "8", "--record", str(tmp_path / "r.txt"), "--no-progress",
               "--chat-template"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("amct-hf calibrate: error:") and "has no chat template" in err[-1]
    assert not (tmp_path / "r.txt").exists()


def test_option_values_are_checked():
    assert DataOptions(chat_template="auto").chat_template == "auto"
    for bad in ("yes", 1, None):
        with pytest.raises(InvalidArgumentError, match="chat_template must be"):
            DataOptions(chat_template=bad)


def test_calibration_on_templated_tiny_tokenizer_says_so(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.chat_template = "{% for m in messages %}{{ m.role }} {{ m.content }} {% endfor %}"
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    kw = dict(tokenizer=tok, num_samples=2, seq_len=16, mode="exact", progress=False, write=False)
    chat = calibrate_kv_cache(model, str(tiny_dir / "corpus.txt"), chat_template=True, **kw)
    plain = calibrate_kv_cache(model, str(tiny_dir / "corpus.txt"), **kw)
    assert chat.chat_template and not plain.chat_template
    assert "tokens of chat-template text" in chat.totals() and "tokens of plain text" in plain.totals()
    assert chat.num_tokens == plain.num_tokens == 32
    assert any(not torch.equal(torch.tensor(chat[n][0]), torch.tensor(plain[n][0])) for n in chat)


def test_cli_and_recipe_flags_reach_the_data_options():
    from amct_hf.cli import build_parser, calibration_options, recipe_args
    parse = lambda *a: build_parser().parse_args(["calibrate", *a])  # noqa: E731
    assert calibration_options(parse("--chat-template"))["data"].chat_template is True
    assert calibration_options(parse("--no-chat-template"))["data"].chat_template is False
    # the command line renders through the template when there is one; the library keeps plain text
    assert calibration_options(parse())["data"].chat_template == "auto"
    assert DataOptions().chat_template is False
    recipe = recipe_args({"model": "some/model"}, ["--chat-template"])
    assert calibration_options(recipe)["data"].chat_template is True


def test_cli_default_uses_a_template_when_there_is_one(tiny_dir, tmp_path, capsys):
    import shutil

    from transformers import AutoTokenizer
    d = tmp_path / "templated"
    shutil.copytree(tiny_dir, d)
    tok = AutoTokenizer.from_pretrained(d)
    tok.chat_template = "{% for m in messages %}{{ m.role }} {{ m.content }} {% endfor %}"
    tok.save_pretrained(d)
    common = ["calibrate", "--dataset", str(tiny_dir / "corpus.txt"), "--num-samples", "2", "--seq-len", "8",
              "--record", str(tmp_path / "r.txt"), "--no-progress"]
    assert main([*common, "--model", str(d)]) == 0
    assert "16 tokens of chat-template text" in capsys.readouterr().out
    assert main([*common, "--model", str(d), "--no-chat-template"]) == 0
    assert "16 tokens of plain text" in capsys.readouterr().out
    assert main([*common, "--model", str(tiny_dir)]) == 0  # no template: plain text, no error
    assert "16 tokens of plain text" in capsys.readouterr().out
