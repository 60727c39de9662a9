"""Torch-free CLIP byte-level BPE tokenizer.

A re-implementation of the tokenizer used by OpenAI CLIP and open_clip (``SimpleTokenizer`` with
``clean='lower'``), so that the serving side can turn text queries into the exact token ids the text
encoder was trained on without importing torch or open_clip. The vocabulary is the gzip'd merges
file (``bpe_simple_vocab_16e6.txt.gz``) that the exporter copies next to ``text_encoder.onnx``.
"""
from __future__ import annotations

import gzip
import html
import os
from functools import lru_cache

import numpy as np
import regex

try:  # ftfy repairs mojibake exactly as open_clip does; without it, cleaning is only html + whitespace.
    import ftfy as _ftfy
except ImportError:  # pragma: no cover - ftfy is a declared dependency
    _ftfy = None

START_OF_TEXT = "<start_of_text>"
END_OF_TEXT = "<end_of_text>"
DEFAULT_CONTEXT_LENGTH = 77
# CLIP keeps the first 49152 - 256 - 2 merges of the file (the first line is a version header).
_NUM_MERGES = 49152 - 256 - 2
# Bound the word -> BPE cache: a serving process sees unbounded user text.
_CACHE_LIMIT = 100_000


@lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable unicode character (CLIP's reversible byte encoding).

    Printable latin-1 bytes map to themselves; the rest map to code points from 256 upwards, so the
    BPE never sees whitespace or control characters.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes)))


def get_pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    """The set of adjacent symbol pairs of a word (a tuple of symbols)."""
    return set(zip(word[:-1], word[1:]))


def basic_clean(text: str) -> str:
    """Fix broken unicode (ftfy, when installed) and double-unescape HTML entities, as CLIP does."""
    if _ftfy is not None:
        text = _ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return text.strip()


def whitespace_clean(text: str) -> str:
    """Collapse runs of whitespace to single spaces."""
    return " ".join(text.split()).strip()


def clean_lower(text: str) -> str:
    """open_clip's default ``clean='lower'``: basic clean, whitespace clean, lowercase."""
    return whitespace_clean(basic_clean(text)).lower()


def load_merges(vocab_path: str | os.PathLike) -> list[tuple[str, str]]:
    """Read the BPE merges from CLIP's gzip'd vocabulary file."""
    path = os.fspath(vocab_path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"BPE vocabulary file {path!r} does not exist")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    return [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]  # type: ignore[misc]


class ClipTokenizer:
    """CLIP BPE tokenizer: ``tokenizer(["a photo of a cat"])`` -> int64 ``[N, context_length]``.

    Output matches ``open_clip.tokenizer.SimpleTokenizer(context_length=L)(texts)``: each row is
    ``<start_of_text> tokens... <end_of_text>`` padded with 0; over-long rows are truncated to
    ``context_length`` with the last position overwritten by ``<end_of_text>``.
    """

    def __init__(self, vocab_path: str | os.PathLike, context_length: int = DEFAULT_CONTEXT_LENGTH) -> None:
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (start and end tokens), got {context_length}")
        self.context_length = int(context_length)
        self.byte_encoder = bytes_to_unicode()
        merges = load_merges(vocab_path)
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [symbol + "</w>" for symbol in vocab]
        vocab.extend("".join(merge) for merge in merges)
        special_tokens = [START_OF_TEXT, END_OF_TEXT]
        vocab.extend(special_tokens)
        self.encoder: dict[str, int] = {token: index for index, token in enumerate(vocab)}
        self.bpe_ranks: dict[tuple[str, str], int] = {merge: rank for rank, merge in enumerate(merges)}
        self._special = {token: token for token in special_tokens}
        self._cache: dict[str, str] = {}
        # Same pattern and flags as CLIP: special tokens, English contractions, letter runs, single
        # digits, runs of other non-space characters.
        self.pattern = regex.compile(
            "|".join(special_tokens) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )
        self.sot_token_id = self.encoder[START_OF_TEXT]
        self.eot_token_id = self.encoder[END_OF_TEXT]
        self.vocab_size = len(self.encoder)

    def bpe(self, token: str) -> str:
        """Apply the merges to one byte-encoded word; returns its symbols joined by spaces."""
        if token in self._special:
            return token
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        word: tuple[str, ...] = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = get_pairs(word)
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            word = self._merge(word, bigram)
            if len(word) == 1:
                break
            pairs = get_pairs(word)
        result = " ".join(word)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[token] = result
        return result

    @staticmethod
    def _merge(word: tuple[str, ...], bigram: tuple[str, str]) -> tuple[str, ...]:
        """Replace every non-overlapping occurrence of ``bigram`` in ``word``, left to right."""
        first, second = bigram
        merged: list[str] = []
        i = 0
        while i < len(word):
            try:
                j = word.index(first, i)
            except ValueError:
                merged.extend(word[i:])
                break
            merged.extend(word[i:j])
            i = j
            if i < len(word) - 1 and word[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(word[i])
                i += 1
        return tuple(merged)

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without start/end tokens and without truncation."""
        ids: list[int] = []
        for piece in self.pattern.findall(clean_lower(text)):
            encoded = "".join(self.byte_encoder[byte] for byte in piece.encode("utf-8"))
            ids.extend(self.encoder[symbol] for symbol in self.bpe(encoded).split(" "))
        return ids

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> np.ndarray:
        """Tokenise ``texts`` into an int64 array ``[N, context_length]`` (zero padded)."""
        if isinstance(texts, str):
            texts = [texts]
        length = int(context_length or self.context_length)
        result = np.zeros((len(texts), length), dtype=np.int64)
        for row, text in enumerate(texts):
            tokens = [self.sot_token_id] + self.encode(text) + [self.eot_token_id]
            if len(tokens) > length:
                tokens = tokens[:length]
                tokens[-1] = self.eot_token_id
            result[row, : len(tokens)] = tokens
        return result
