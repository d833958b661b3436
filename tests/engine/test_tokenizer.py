"""Tokenizer wrapper and incremental detokenizer, on the default SmolLM2 GGUF tokenizer."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from pdserve.engine.config import PRESETS, ModelSpec
from pdserve.engine.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer
from pdserve.engine.weights import load_model_config, read_gguf_string

TEXTS = [
    "Hello, world! How are you today?",
    "Crème brûlée, façade, naïve coöperation, Ångström, smörgåsbord.",
    "Emoji: 😀🎉👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and ❤️ hearts.",
    "中文测试：你好，世界！日本語のテキスト。한국어 텍스트입니다.",
    "Math ∑ ∫ √ ≤ ≥ ≠ ∞, arrows → ← ↔, Greek αβγδ ΩΨΦ, Cyrillic Привет мир.",
    "  leading spaces, tabs\tand\nnewlines\n\n  and trailing  ",
    "def f(x):\n    return x ** 2  # code with symbols {}[]<>|\\~`",
]


@pytest.fixture(scope="module")
def tok(default_gguf: Path) -> Tokenizer:
    spec = ModelSpec(source="gguf", path=str(default_gguf))
    return load_tokenizer(spec, load_model_config(spec))


def test_encode_decode_roundtrip(tok: Tokenizer) -> None:
    assert tok.vocab_size == 49152
    assert tok.eos_token_ids == (2,)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids and all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    # SmolLM2's tokenizer adds no BOS to raw text.
    assert tok.encode("Hello world") == [19556, 905]


def test_decode_through_the_backend_equals_the_wrapper(tok: Tokenizer) -> None:
    """The Rust backend's decode gives the text that transformers' wrapper gives (with no
    space clean-up), special tokens kept or skipped, on text and on random ids."""
    hf = tok._hf
    assert tok._backend is not None
    rng = random.Random(3)
    runs = [tok.encode(t) for t in TEXTS]
    runs += [[rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
             for _ in range(200)]
    runs += [[0, 1, 2, *tok.encode("hi"), 2]]  # special tokens
    for ids in runs:
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(
                ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


def test_chat_template(tok: Tokenizer) -> None:
    ids = tok.apply_chat_template([("system", "Be brief."), ("user", "What is 2+2?")])
    assert tok.decode(ids, skip_special_tokens=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert ids[0] == 1 and ids.count(1) == 3  # <|im_start|> as one special token
    # Without a system message the template supplies SmolLM2's default one.
    ids = tok.apply_chat_template([("user", "Hi")])
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_comes_from_the_gguf(tok: Tokenizer, default_gguf: Path) -> None:
    assert tok._hf.chat_template == read_gguf_string(default_gguf, "tokenizer.chat_template")


def test_hf_folder_tokenizer(tok: Tokenizer, tmp_path: Path) -> None:
    tok._hf.save_pretrained(tmp_path)
    hf_tok = load_tokenizer(ModelSpec(source="hf", path=str(tmp_path)), PRESETS["smollm2-135m"])
    assert hf_tok.eos_token_ids == (2,)
    for text in TEXTS:
        assert hf_tok.encode(text) == tok.encode(text)
    messages = [("user", "Bonjour 🌍")]
    assert hf_tok.apply_chat_template(messages) == tok.apply_chat_template(messages)
    with pytest.raises(FileNotFoundError, match="HF model folder not found"):
        load_tokenizer(ModelSpec(source="hf", path=str(tmp_path / "nope")),
                       PRESETS["smollm2-135m"])


def test_dummy_uses_stand_in_tokenizer() -> None:
    spec = ModelSpec(source="dummy", preset="llama-3.1-8b")
    tok = load_tokenizer(spec, PRESETS["llama-3.1-8b"])
    assert tok.eos_token_ids == (128001, 128008, 128009)
    hello = tok.encode("Hello")
    assert tok.decode([*hello, 100000, *hello, 128255]) == "Hello<tok_100000>Hello<tok_128255>"
    detok = IncrementalDetokenizer(tok, hello)
    pieces = [detok.add([i]) for i in (*hello, 60000, 128000, *hello)] + [detok.flush()]
    assert "".join(pieces) == detok.text == "Hello<tok_60000><tok_128000>Hello"


def _stream(tok: Tokenizer, ids: list[int], rng: random.Random,
            prompt: list[int] | None = None) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tok, prompt or [])
    pieces, pos = [], 0
    while pos < len(ids):
        step = rng.choice([1, 1, 1, 2, 3, 5])
        pieces.append(detok.add(ids[pos:pos + step]))
        pos += step
    return pieces, detok


def _check_stream(tok: Tokenizer, ids: list[int], rng: random.Random) -> None:
    full = tok.decode(ids)
    pieces, detok = _stream(tok, ids, rng)
    streamed = "".join(pieces)
    assert detok.text == streamed
    assert full.startswith(streamed)  # nothing emitted is ever taken back
    if not full.endswith("\ufffd"):
        assert streamed == full  # nothing is left behind either
    pieces.append(detok.flush())
    assert "".join(pieces) == full == detok.text
    assert all("\ufffd" not in p for p in pieces if "\ufffd" not in full)


def test_incremental_matches_full_decode_on_text(tok: Tokenizer) -> None:
    rng = random.Random(0)
    for text in TEXTS:
        for _ in range(5):
            _check_stream(tok, tok.encode(text), rng)
    # Chat-formatted output with special tokens, which decoding skips.
    ids = tok.apply_chat_template([("user", "Ça va? 😀")]) + tok.encode("Très bien 👍") + [2]
    _check_stream(tok, ids, rng)


def test_incremental_matches_full_decode_on_random_ids(tok: Tokenizer) -> None:
    rng = random.Random(1234)
    # Tokens whose text alone is an unfinished UTF-8 sequence (byte-level pieces): mixing
    # many of them in makes held-back and invalid sequences common.
    partial = [i for i in range(tok.vocab_size) if tok.decode([i]).endswith("\ufffd")]
    assert len(partial) > 100
    for trial in range(300):
        p_partial = (0.0, 0.3, 0.7)[trial % 3]
        ids = [rng.choice(partial) if rng.random() < p_partial else rng.randrange(tok.vocab_size)
               for _ in range(rng.randint(1, 60))]
        _check_stream(tok, ids, rng)


def test_incremental_holds_back_partial_utf8(tok: Tokenizer) -> None:
    ids = tok.encode("ok 😀 done")
    pieces = [tok.decode([i]) for i in ids]
    assert sum(p.endswith("\ufffd") for p in pieces) >= 2, pieces  # the emoji spans tokens
    detok = IncrementalDetokenizer(tok, tok.encode("prompt"))
    for k, i in enumerate(ids):
        new = detok.add([i])
        assert "\ufffd" not in new
        # Exactly the unfinished character is held back; text before it goes out at once.
        assert detok.text == tok.decode(ids[:k + 1]).rstrip("\ufffd")
    assert detok.text == "ok 😀 done"
    assert detok.flush() == ""

    # A stream that ends mid-character: held back until flush, which writes U+FFFD as the
    # full decode does.
    emoji = tok.encode("😀")
    assert len(emoji) > 1
    detok = IncrementalDetokenizer(tok, [])
    assert detok.add(emoji[:-1]) == ""
    assert detok.text == ""
    tail = detok.flush()
    assert tail == tok.decode(emoji[:-1]) and tail.endswith("\ufffd")


def test_incremental_window_stays_small(tok: Tokenizer) -> None:
    ids = tok.encode(" ".join(TEXTS) * 3)
    detok = IncrementalDetokenizer(tok, [])
    widest = 0
    for i in ids:
        detok.add([i])
        widest = max(widest, len(detok.output_ids) - detok.prefix_offset)
    assert widest <= 8
    assert detok.text == tok.decode(ids)


def test_incremental_chunks_ending_mid_character(tok: Tokenizer) -> None:
    """Korean here is three byte-tokens a character; adding two at a time ends most chunks
    mid-character, so the window rarely ends clean by itself."""
    ids = tok.encode("한국어 텍스트입니다 " * 40)
    detok = IncrementalDetokenizer(tok, [])
    widest = 0
    for pos in range(0, len(ids), 2):
        assert "\ufffd" not in detok.add(ids[pos:pos + 2])
        assert tok.decode(ids).startswith(detok.text)
        widest = max(widest, len(detok.output_ids) - detok.prefix_offset)
    detok.flush()
    assert detok.text == tok.decode(ids)
    assert widest <= 2 * IncrementalDetokenizer.SCAN_HELD_TOKENS


def test_incremental_garbage_stays_bounded(tok: Tokenizer) -> None:
    """A dummy model stuck on one lead byte: no character ever completes."""
    lead = next(i for i in range(tok.vocab_size) if tok.decode([i]) == "\ufffd"
                and tok.decode([i, i]) == "\ufffd\ufffd")
    detok = IncrementalDetokenizer(tok, [])
    for _ in range(3 * IncrementalDetokenizer.FORCE_HELD_TOKENS):
        detok.add([lead])
        assert len(detok.output_ids) - detok.prefix_offset <= (
            2 * IncrementalDetokenizer.FORCE_HELD_TOKENS)
    detok.flush()
    assert detok.text == tok.decode(detok.output_ids)


def test_byte_level_fallback_round_trips_and_streams() -> None:
    from pdserve.engine.tokenizer import IncrementalDetokenizer, Tokenizer, byte_level_tokenizer

    tok = Tokenizer(byte_level_tokenizer(), (256,))
    text = "héllo wörld 🙂"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode()) and max(ids) < 256
    assert tok.decode(ids) == text
    detok = IncrementalDetokenizer(tok, [])
    assert "".join(detok.add([i]) for i in ids) + detok.flush() == text
    assert tok.apply_chat_template([("user", "hi")])  # has a template
