"""Captions from an exported CoCa model, without torch: greedy decoding on ONNX Runtime.

``python -m export`` writes, for a ``coca`` model, two graphs beside the encoders (``preprocess.json`` lists
them under ``"captioner"``)::

    caption_image.onnx     the image encoder's input ("pixels" or "images", as preprocess.json's input_format)
                           -> "image_tokens" float32 [N, T, D]: the image tokens the decoder cross-attends to
    caption_decoder.onnx   "image_tokens" [N, T, D], "tokens" int64 [N, L] (the caption so far, start token
                           first, padded with 0 to the context length L), "positions" int64 [N] (index of each
                           row's last token) -> "logits" float32 [N, V]: the scores of the next token

    captioner = Captioner("RUN/onnx")
    captioner.caption([pil_image])          # ["a photo of a cat"]

Greedy decoding starts from ``<start_of_text>``, appends the highest-scoring token until ``<end_of_text>`` or
``max_length`` tokens, and decodes the ids with the exported BPE vocabulary. Each step runs the whole (padded)
prefix again: the graphs hold no key/value cache, which costs little at the context lengths used here.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from export.contract import (
    FLOAT_NCHW, VOCAB_NAME, EncoderError, Preprocess, empty_batch, input_dtype, prepare_image, read_preprocess,
)
from export.tokenizer import ClipTokenizer, bytes_to_unicode

CAPTION_IMAGE_MODEL = "caption_image.onnx"
CAPTION_DECODER_MODEL = "caption_decoder.onnx"
IMAGE_TOKENS = "image_tokens"
TOKENS = "tokens"
POSITIONS = "positions"
LOGITS = "logits"
DECODING = ("greedy: tokens = [start_token] padded with pad_token to context_length; repeat: logits = decoder("
            "image_tokens, tokens, positions = index of the last token), append argmax(logits), until end_token or "
            "context_length tokens")


def captioner_info(context_length: int, vocab_size: int, image_input: str) -> dict:
    """The ``"captioner"`` entry of ``preprocess.json`` (the exporter adds nothing else; parity goes under
    ``parity.caption_image`` / ``parity.caption_decoder``)."""
    return {
        "image": CAPTION_IMAGE_MODEL, "decoder": CAPTION_DECODER_MODEL, "image_input": image_input,
        "image_output": IMAGE_TOKENS, "decoder_inputs": [IMAGE_TOKENS, TOKENS, POSITIONS], "decoder_output": LOGITS,
        "context_length": int(context_length), "vocab_file": VOCAB_NAME, "start_token": int(vocab_size) - 2,
        "end_token": int(vocab_size) - 1, "pad_token": 0, "decoding": DECODING,
    }


def has_captioner(info: dict) -> bool:
    """Whether ``preprocess.json`` describes caption graphs (a CoCa export)."""
    return bool(info.get("captioner"))


def decode_tokens(tokenizer: ClipTokenizer, ids: Sequence[int]) -> str:
    """Token ids -> text, as open_clip's ``SimpleTokenizer.decode``: symbols joined, the byte encoding undone,
    each word end ``</w>`` a space; special tokens (start / end of text) dropped."""
    table = _decoder_table(tokenizer)
    special = {tokenizer.sot_token_id, tokenizer.eot_token_id}
    symbols = "".join(table[int(i)] for i in ids if int(i) not in special)
    byte_decoder = {char: byte for byte, char in bytes_to_unicode().items()}
    text = bytearray(byte_decoder[char] for char in symbols).decode("utf-8", errors="replace")
    return text.replace("</w>", " ").strip()


def _decoder_table(tokenizer: ClipTokenizer) -> dict[int, str]:
    table = getattr(tokenizer, "_id_to_symbol", None)
    if table is None:
        table = {index: symbol for symbol, index in tokenizer.encoder.items()}
        tokenizer._id_to_symbol = table  # built once per tokenizer: 49408 entries
    return table


class Captioner:
    """Generates captions with the caption graphs of an exported CoCa model (``onnx_dir``: ``RUN/onnx``).

    ``providers``: onnxruntime providers, best first (default: ``export.runtime.default_providers()``);
    ``threads``: intra-op CPU threads. Raises ``EncoderError`` when the export has no caption graphs."""

    def __init__(self, onnx_dir: str | os.PathLike, providers: Sequence[Any] | None = None,
                 threads: int | None = None) -> None:
        import onnxruntime as ort

        from export.runtime import default_providers, session_options

        self.directory = Path(onnx_dir).expanduser().resolve()
        if not self.directory.is_dir():
            raise FileNotFoundError(f"encoder directory {str(self.directory)!r} does not exist")
        info = read_preprocess(self.directory)
        spec = info.get("captioner")
        if not spec:
            model = info.get("model") if isinstance(info.get("model"), dict) else {}
            raise EncoderError(f"{self.directory} has no caption decoder (objective {model.get('objective')!r}); "
                               f"captions need a coca model exported with python -m export")
        self._spec = dict(spec)
        self._preprocess = Preprocess.from_dict(info)
        self._input_format = str(info.get("input_format", FLOAT_NCHW))
        paths = {name: self.directory / str(spec[name]) for name in ("image", "decoder")}
        vocab = self.directory / str(spec.get("vocab_file", VOCAB_NAME))
        for path in (*paths.values(), vocab):
            if not path.is_file():
                raise FileNotFoundError(f"caption file {str(path)!r} does not exist")
        self.context_length = int(spec["context_length"])
        self.start_token, self.end_token = int(spec["start_token"]), int(spec["end_token"])
        self.pad_token = int(spec.get("pad_token", 0))
        self.tokenizer = ClipTokenizer(vocab, context_length=self.context_length)
        options = session_options(threads=threads)
        chosen = list(providers) if providers is not None else default_providers()
        self._image = ort.InferenceSession(str(paths["image"]), sess_options=options, providers=chosen)
        self._decoder = ort.InferenceSession(str(paths["decoder"]), sess_options=options, providers=chosen)
        self._image_input = str(spec.get("image_input") or self._image.get_inputs()[0].name)

    def prepare(self, images: Sequence[Any]) -> np.ndarray:
        """PIL images (any size or mode) -> one input batch in the export's ``input_format``."""
        if not images:
            return empty_batch(self._preprocess, self._input_format)
        return np.stack([prepare_image(image, self._preprocess, self._input_format) for image in images])

    def image_tokens(self, batch: np.ndarray) -> np.ndarray:
        """Prepared inputs (see ``prepare``) -> the decoder's image tokens float32 [N, T, D]."""
        batch = np.ascontiguousarray(batch, dtype=input_dtype(self._input_format))
        return self._image.run([IMAGE_TOKENS], {self._image_input: batch})[0]

    def next_token_logits(self, image_tokens: np.ndarray, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One decoder step: [N, T, D], int64 [N, L] padded prefixes, int64 [N] last positions -> [N, V]."""
        feeds = {IMAGE_TOKENS: image_tokens, TOKENS: np.ascontiguousarray(tokens, dtype=np.int64),
                 POSITIONS: np.ascontiguousarray(positions, dtype=np.int64)}
        return self._decoder.run([LOGITS], feeds)[0]

    def generate(self, batch: np.ndarray, max_length: int | None = None) -> list[list[int]]:
        """Greedy token ids of each prepared image: the caption without start and end tokens, at most
        ``max_length`` tokens (default and upper bound: the context length minus the start token)."""
        limit = self.context_length - 1 if max_length is None else int(max_length)
        if not 1 <= limit <= self.context_length - 1:
            raise ValueError(f"max_length must be in [1, {self.context_length - 1}], got {max_length}")
        image_tokens = self.image_tokens(batch)
        count = image_tokens.shape[0]
        tokens = np.full((count, self.context_length), self.pad_token, dtype=np.int64)
        tokens[:, 0] = self.start_token
        lengths = np.ones(count, dtype=np.int64)
        done = np.zeros(count, dtype=bool)
        for _ in range(limit):
            if done.all():
                break
            live = np.flatnonzero(~done)  # finished rows are not run again
            chosen = self.next_token_logits(image_tokens[live], tokens[live], lengths[live] - 1).argmax(axis=1)
            tokens[live, lengths[live]] = chosen
            lengths[live] += 1
            done[live] = chosen == self.end_token
        captions = []
        for row, length in zip(tokens, lengths):
            ids = row[1:length].tolist()
            captions.append(ids[:-1] if ids and ids[-1] == self.end_token else ids)
        return captions

    def caption(self, images: Sequence[Any], max_length: int | None = None) -> list[str]:
        """PIL images -> one generated caption each (greedy)."""
        images = list(images)
        if not images:
            return []
        return [decode_tokens(self.tokenizer, ids) for ids in self.generate(self.prepare(images), max_length)]

    def __repr__(self) -> str:
        return f"Captioner({str(self.directory)!r}, context_length={self.context_length})"
