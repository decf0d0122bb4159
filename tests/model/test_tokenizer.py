"""Tokenizer: chat template and encoding against transformers, streaming decode exactness."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from kvrt.runtime.model.tokenizer import IncrementalDetokenizer, Tokenizer

TEXT_IDS = ["ascii", "emoji", "cjk", "mixed"]
CHATS = [
    [{"role": "user", "content": "What is 12 times 11?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hi 👋 in Japanese: こんにちは"},
        {"role": "assistant", "content": "こんにちは 😀"},
        {"role": "user", "content": "Thanks!"},
    ],
]
TEXTS = [
    "Hello, world! The quick brown fox.",
    "Emoji 😀👍🏽🇫🇷 and a family 👨‍👩‍👧 in between words.",
    "中文测试：你好，世界。日本語のテキスト、한국어 텍스트.",
    "Mixed: café naïve — “quotes” ½ ∑ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and\nnew lines\ttabs.",
]


@pytest.fixture(scope="module", params=["default", "tiny"])
def pair(request, tiny_checkpoint_dir) -> tuple[Tokenizer, object]:
    """(our Tokenizer, transformers' AutoTokenizer for the same files)."""
    if request.param == "tiny":
        folder = tiny_checkpoint_dir("qwen2")
        return Tokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    path = request.getfixturevalue("default_model_path")
    ours = request.getfixturevalue("default_checkpoint").tokenizer
    return ours, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.parametrize("chat", CHATS)
def test_chat_template_equals_transformers(pair, chat):
    ours, theirs = pair
    for gen in (True, False):
        expected = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
        assert ours.render_chat(chat, add_generation_prompt=gen) == expected
    ids = ours.encode_chat(chat)
    assert ids == theirs.encode(ours.render_chat(chat), add_special_tokens=False)
    assert ours.decode(ids, skip_special_tokens=False) == ours.render_chat(chat)


@pytest.mark.parametrize("text", TEXTS, ids=TEXT_IDS)
def test_encode_decode_equal_transformers(pair, text):
    ours, theirs = pair
    assert ours.encode(text) == theirs.encode(text)
    assert ours.decode(ours.encode(text)) == theirs.decode(theirs.encode(text)) == text


@pytest.mark.parametrize("text", TEXTS, ids=TEXT_IDS)
def test_incremental_detokenizer_concatenates_to_decode(pair, text):
    ours, _ = pair
    ids = ours.encode(text)
    stream = ours.detokenizer()
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.flush())
    assert "".join(pieces) == ours.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)  # never half a character


def test_multibyte_characters_are_split_across_tokens(pair):
    # The detokenizer test above is only meaningful if some tokens hold part of a character.
    ours, _ = pair
    ids = ours.encode("😀👍🏽")
    assert any("\ufffd" in ours.decode([i]) for i in ids)


def test_special_tokens_are_skipped_in_stream(pair):
    ours, _ = pair
    ids = ours.encode_chat(CHATS[1])
    stream = ours.detokenizer()
    text = "".join(stream.push(i) for i in ids) + stream.flush()
    assert text == ours.decode(ids) and "<|im_start|>" not in text
    raw = ours.detokenizer(skip_special_tokens=False)
    assert "".join(raw.push(i) for i in ids) + raw.flush() == ours.render_chat(CHATS[1])


def test_flush_shows_an_incomplete_trailing_character(pair):
    ours, _ = pair
    ids = ours.encode("ok 😀")
    cut = next(n for n in range(len(ids), 0, -1) if ours.decode(ids[:n]).endswith("\ufffd"))
    stream = ours.detokenizer()
    held = "".join(stream.push(i) for i in ids[:cut])
    assert not held.endswith("\ufffd")
    assert held + stream.flush() == ours.decode(ids[:cut])


def test_detokenizer_decodes_short_windows():
    """Per-token work stays constant: no decode of the whole output at every step."""
    windows: list[int] = []

    def decode(ids: list[int]) -> str:
        windows.append(len(ids))
        return "".join(chr(0x61 + i % 26) for i in ids)

    stream = IncrementalDetokenizer(decode)
    text = "".join(stream.push(i) for i in range(2000)) + stream.flush()
    assert len(text) == 2000 and max(windows) <= 2


def test_eos_token_ids(pair):
    ours, theirs = pair
    # SmolLM2's generation_config and the tiny one both stop on <|im_end|> (id 2) only.
    assert ours.eos_token_ids == frozenset({2}) == frozenset({theirs.eos_token_id})
    assert Tokenizer(theirs, eos_token_ids=[5]).eos_token_ids == frozenset({2, 5})


def test_chatml_models_stop_at_im_end(tiny_checkpoint_dir):
    # Like a Qwen2.5 base model: eos is <|endoftext|>, but the ChatML template ends turns with
    # <|im_end|>, and a chat served from it must stop there.
    hf = AutoTokenizer.from_pretrained(tiny_checkpoint_dir("llama"))
    hf.eos_token = "<|endoftext|>"
    assert Tokenizer(hf).eos_token_ids == frozenset({0, 2})
    hf.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert Tokenizer(hf).eos_token_ids == frozenset({0})


def test_render_chat_without_template_is_a_value_error(tiny_checkpoint_dir):
    hf = AutoTokenizer.from_pretrained(tiny_checkpoint_dir("llama"))
    hf.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer(hf).render_chat(CHATS[0])


def test_vocab_and_bos(pair):
    ours, theirs = pair
    assert ours.vocab_size == len(theirs)
    assert ours.bos_token_id == theirs.bos_token_id


def test_encode_pieces_is_encode_piece_of_each(pair):
    ours, _ = pair
    pieces = ["", *TEXTS, ours.render_chat(CHATS[1], add_generation_prompt=False)]
    assert ours.encode_pieces(pieces) == [ours.encode_piece(p) for p in pieces]
    assert ours.encode_pieces([]) == []


def test_no_token_spells_more_characters_than_max_token_chars(pair):
    """What the early length check relies on: a token never decodes to more characters than
    `max_token_chars`, so N characters of text need at least N / max_token_chars tokens."""
    ours, _ = pair
    longest = max(len(ours.hf.decode([i], skip_special_tokens=False))
                  for i in range(ours.vocab_size))
    assert 1 <= longest <= ours.max_token_chars
    text = "word " * 2000  # and a real text takes at least its length over that many tokens
    assert len(ours.encode(text)) >= len(text) / ours.max_token_chars
