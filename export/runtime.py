"""ONNX Runtime encoder: images (and texts) -> L2-normalised embeddings, without torch.

Reads a directory written by ``python -m export``::

    image_encoder.onnx   input "pixels" float32 [N, C, H, W] -> output "embedding" float32 [N, D]
    text_encoder.onnx    (image-text models only) input "tokens" int64 [N, L] -> "embedding" [N, D]
    preprocess.json      image_size, channels, mean, std, resize, crop, embed_dim, input/output names,
                         tokenizer (null or {"type": "clip_bpe", "vocab_file", "context_length"}), model
    <vocab_file>         CLIP BPE merges, when the model has a text encoder

Serving code (``index``, ``app``) depends on this module, so it must never import torch.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from trainer.data.preprocess import Preprocess, preprocess_batch

logger = logging.getLogger(__name__)

IMAGE_MODEL = "image_encoder.onnx"
TEXT_MODEL = "text_encoder.onnx"
PREPROCESS = "preprocess.json"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class EncoderError(RuntimeError):
    """An encoder directory that cannot be used (missing files, inconsistent metadata)."""


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation; zero rows stay zero instead of becoming NaN."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def _cuda_driver_present() -> bool:
    """Whether an NVIDIA driver can be loaded.

    onnxruntime-gpu lists CUDAExecutionProvider even on machines without a GPU and then logs a loud
    error when the session falls back; probing libcuda first keeps CPU-only machines quiet.
    """
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def default_providers() -> list[str]:
    """CUDA first when onnxruntime offers it and a driver is present, always CPU as the fallback."""
    import onnxruntime as ort

    providers = [CPU]
    if CUDA in ort.get_available_providers() and _cuda_driver_present():
        preload = getattr(ort, "preload_dlls", None)
        if preload is not None:
            # Without torch in the process nothing else loads the pip-installed CUDA/cuDNN libraries.
            try:
                preload()
            except Exception as error:  # noqa: BLE001 - a failed preload only means CPU fallback
                logger.debug("onnxruntime.preload_dlls failed: %s", error)
        providers.insert(0, CUDA)
    return providers


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise EncoderError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise EncoderError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _static_dim(shape: Sequence[Any]) -> int | None:
    """The last dimension of an ONNX shape when it is a fixed integer, else None."""
    if not shape:
        return None
    last = shape[-1]
    return int(last) if isinstance(last, int) else None


class Encoder:
    """Embeds images (and, for image-text models, texts) with the exported ONNX encoders."""

    def __init__(self, onnx_dir: str | os.PathLike, providers: Sequence[str] | None = None) -> None:
        self.directory = Path(onnx_dir).expanduser().resolve()
        if not self.directory.is_dir():
            raise FileNotFoundError(f"encoder directory {str(self.directory)!r} does not exist")
        info_path = self.directory / PREPROCESS
        image_path = self.directory / IMAGE_MODEL
        for required in (info_path, image_path):
            if not required.is_file():
                raise FileNotFoundError(f"encoder file {str(required)!r} does not exist")
        self._info = _read_json(info_path)
        self._preprocess = Preprocess.from_dict(self._info)
        self._output = str(self._info.get("output", "embedding"))
        self._providers = list(providers) if providers is not None else default_providers()
        self._image_session = self._open(image_path)
        self._image_input = self._check_input(self._image_session, image_path, self._info.get("image_input", "pixels"))
        self._dim = self._resolve_dim(self._image_session, image_path)
        self._text_session = None
        self._tokenizer = None
        text_path = self.directory / TEXT_MODEL
        if text_path.is_file():
            self._text_session = self._open(text_path)
            self._text_input = self._check_input(self._text_session, text_path, self._info.get("text_input", "tokens"))
            self._check_output_dim(self._text_session, text_path)
            self._tokenizer = self._load_tokenizer()

    # -- construction helpers -------------------------------------------------------------------

    def _open(self, path: Path):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: fallbacks are reported once, below, by us
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=self._providers)
        except Exception as error:  # onnxruntime raises its own exception types for corrupt models
            raise EncoderError(f"cannot load ONNX model {str(path)!r}: {error}") from error
        used = session.get_providers()
        logger.info("%s runs on %s", path.name, used[0] if used else "no provider")
        if self._providers and self._providers[0] == CUDA and used and used[0] != CUDA:
            logger.warning("CUDA was requested for %s but onnxruntime fell back to %s", path.name, used[0])
        return session

    def _check_input(self, session, path: Path, expected: str) -> str:
        names = [node.name for node in session.get_inputs()]
        if expected not in names:
            raise EncoderError(f"{path} has inputs {names}, but {PREPROCESS} names the input {expected!r}")
        outputs = [node.name for node in session.get_outputs()]
        if self._output not in outputs:
            raise EncoderError(f"{path} has outputs {outputs}, but {PREPROCESS} names the output {self._output!r}")
        return expected

    def _output_shape(self, session) -> Sequence[Any]:
        return next(node.shape for node in session.get_outputs() if node.name == self._output)

    def _resolve_dim(self, session, path: Path) -> int:
        """The embedding dimension: ``embed_dim`` from preprocess.json, checked against the model."""
        static = _static_dim(self._output_shape(session))
        declared = self._info.get("embed_dim")
        if declared is None:
            if static is None:
                raise EncoderError(f"{PREPROCESS} has no embed_dim and {path.name} has a dynamic output size")
            return static
        declared = int(declared)
        if static is not None and static != declared:
            raise EncoderError(
                f"{PREPROCESS} says embed_dim={declared} but {path} outputs {static}-dimensional embeddings"
            )
        return declared

    def _check_output_dim(self, session, path: Path) -> None:
        static = _static_dim(self._output_shape(session))
        if static is not None and static != self._dim:
            raise EncoderError(f"{path} outputs {static}-dimensional embeddings but the image encoder's are {self._dim}")

    def _load_tokenizer(self):
        from export.tokenizer import ClipTokenizer

        spec = self._info.get("tokenizer")
        if not spec:
            raise EncoderError(f"{self.directory} holds {TEXT_MODEL} but {PREPROCESS} describes no tokenizer")
        if spec.get("type", "clip_bpe") != "clip_bpe":
            raise EncoderError(f"unsupported tokenizer type {spec.get('type')!r} in {PREPROCESS}")
        vocab = self.directory / spec.get("vocab_file", "bpe_simple_vocab_16e6.txt.gz")
        if not vocab.is_file():
            raise FileNotFoundError(f"tokenizer vocabulary {str(vocab)!r} does not exist")
        return ClipTokenizer(vocab, context_length=int(spec.get("context_length", 77)))

    # -- public API ------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Embedding dimension D."""
        return self._dim

    @property
    def has_text(self) -> bool:
        """Whether this model has a text encoder (image-text models)."""
        return self._text_session is not None

    @property
    def preprocess(self) -> Preprocess:
        """How images are resized and normalised before the image encoder."""
        return self._preprocess

    @property
    def info(self) -> dict:
        """The parsed ``preprocess.json`` (includes the free-form ``model`` card)."""
        return self._info

    @property
    def providers(self) -> list[str]:
        """The execution providers the image session actually uses, best first."""
        return list(self._image_session.get_providers())

    def _run(self, session, name: str, batch: np.ndarray, source: str) -> np.ndarray:
        output = session.run([self._output], {name: batch})[0]
        if output.ndim != 2 or output.shape[1] != self._dim:
            raise EncoderError(
                f"{source} produced embeddings of shape {tuple(output.shape)} but {PREPROCESS} says embed_dim={self._dim}"
            )
        return output.astype(np.float32, copy=False)

    def encode_pixels(self, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Embed already preprocessed pixels float32 [N, C, H, W]; returns L2-normalised float32 [N, D]."""
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        chunks = [
            self._run(self._image_session, self._image_input, pixels[start : start + batch_size], IMAGE_MODEL)
            for start in range(0, len(pixels), max(1, batch_size))
        ]
        if not chunks:
            return np.zeros((0, self._dim), dtype=np.float32)
        return l2_normalize(np.concatenate(chunks))

    def encode_images(self, images: Iterable[Any], batch_size: int = 64) -> np.ndarray:
        """Embed PIL images (any size or mode); returns L2-normalised float32 [N, D]."""
        images = list(images)
        step = max(1, batch_size)
        chunks = [
            self.encode_pixels(preprocess_batch(list(images[start : start + step]), self._preprocess), step)
            for start in range(0, len(images), step)
        ]
        if not chunks:
            return np.zeros((0, self._dim), dtype=np.float32)
        return np.concatenate(chunks)

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """Token ids int64 [N, L] as the text encoder expects them."""
        if self._tokenizer is None:
            raise EncoderError(self._no_text_message())
        return self._tokenizer(list(texts))

    def encode_texts(self, texts: Sequence[str] | str, batch_size: int = 256) -> np.ndarray:
        """Embed texts; returns L2-normalised float32 [N, D]. Raises EncoderError for image-only models."""
        if self._text_session is None:
            raise EncoderError(self._no_text_message())
        if isinstance(texts, str):
            texts = [texts]
        tokens = self.tokenize(texts)
        step = max(1, batch_size)
        chunks = [
            self._run(self._text_session, self._text_input, tokens[start : start + step], TEXT_MODEL)
            for start in range(0, len(tokens), step)
        ]
        if not chunks:
            return np.zeros((0, self._dim), dtype=np.float32)
        return l2_normalize(np.concatenate(chunks))

    def _no_text_message(self) -> str:
        model = self._info.get("model")
        objective = model.get("objective", "unknown") if isinstance(model, dict) else "unknown"
        return (
            f"the model in {self.directory} (objective {objective!r}) has no text encoder "
            f"({TEXT_MODEL} is absent); text queries need an image-text model"
        )

    def __repr__(self) -> str:
        return f"Encoder({str(self.directory)!r}, dim={self._dim}, has_text={self.has_text}, providers={self.providers})"
