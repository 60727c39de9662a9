"""The torch-free CLIP tokenizer produces exactly open_clip's token ids."""
from __future__ import annotations

import os

import numpy as np
import pytest

from export.tokenizer import ClipTokenizer, bytes_to_unicode

open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer", reason="open_clip is needed as the reference")

TEXTS = [
    "a photo of a cat",
    "A PHOTO OF A DOG.",
    "",
    "   ",
    "hello, world! what's up? it'll be fine; they've gone -- we'd say I'm OK",
    "don't  stop\tme\nnow",
    "café naïve résumé coöperate",
    "日本語のテキストと中文字符",
    "emoji 🐱🚀 and ✨sparkles✨",
    "numbers 1234567890 and 3.14159 and 1,000,000",
    "&amp; html entities &lt;b&gt; &amp;amp;",
    "mojibake: Ã©tÃ© (ftfy fixes this)",
    "<start_of_text> literal special tokens <end_of_text>",
    "URL https://example.com/path?q=1&x=y#frag",
    "under_score snake_case camelCase kebab-case",
    "tabs\tand\r\nwindows line endings",
    "Ελληνικά και русский текст",
    "a" * 300,
    " ".join(["the quick brown fox jumps over the lazy dog"] * 20),
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "!!!???...,,,;;;:::",
]


@pytest.fixture(scope="module")
def vocab_path() -> str:
    return os.path.join(os.path.dirname(open_clip_tokenizer.__file__), "bpe_simple_vocab_16e6.txt.gz")


@pytest.mark.parametrize("context_length", [77, 16])
def test_matches_open_clip(vocab_path: str, context_length: int) -> None:
    ours = ClipTokenizer(vocab_path, context_length=context_length)(TEXTS)
    reference = open_clip_tokenizer.SimpleTokenizer(context_length=context_length)(TEXTS).numpy()
    assert ours.dtype == np.int64
    assert ours.shape == (len(TEXTS), context_length)
    for text, mine, theirs in zip(TEXTS, ours, reference):
        assert mine.tolist() == theirs.tolist(), f"token ids differ for {text!r}"


def test_truncation_keeps_end_token(vocab_path: str) -> None:
    tokenizer = ClipTokenizer(vocab_path, context_length=8)
    row = tokenizer(["one two three four five six seven eight nine ten"])[0]
    assert row[0] == tokenizer.sot_token_id
    assert row[-1] == tokenizer.eot_token_id
    assert (row != 0).all()


def test_single_string_and_padding(vocab_path: str) -> None:
    tokenizer = ClipTokenizer(vocab_path, context_length=10)
    row = tokenizer("cat")
    assert row.shape == (1, 10)
    assert row[0, 0] == tokenizer.sot_token_id
    assert row[0, 2] == tokenizer.eot_token_id
    assert (row[0, 3:] == 0).all()


def test_byte_encoder_is_a_bijection() -> None:
    mapping = bytes_to_unicode()
    assert sorted(mapping) == list(range(256))
    assert len(set(mapping.values())) == 256


def test_missing_vocab_file_is_named(tmp_path) -> None:
    missing = tmp_path / "nope.txt.gz"
    with pytest.raises(FileNotFoundError, match="nope.txt.gz"):
        ClipTokenizer(missing)
