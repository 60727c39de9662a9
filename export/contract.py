"""The serving contract: the encoder directory ``python -m export`` writes and every reader of it.

An encoder directory (``RUN/onnx``)::

    image_encoder.onnx       input "pixels" float32 [N, C, H, W] (normalised; ``float32_nchw``), or with
                             ``--uint8-input`` "images" uint8 [N, H, W, C] (``uint8_nhwc``: the graph scales
                             and normalises) -> "embedding" float32 [N, D], *not* L2-normalised
    text_encoder.onnx        (image-text models only) input "tokens" int64 [N, L] -> "embedding" [N, D]
    *.fp16.onnx              (``--fp16``) float16 variants with float32 inputs/outputs, for GPUs
    image_encoder.int8.onnx  (``--int8``) statically quantised (QDQ) image encoder for CPUs, same inputs and
                             outputs; written only when it met the export's quality bound on held-out images
    int8_report.json         (``--int8``) its calibration set, method and agreement with float32
    preprocess.json          image_size, channels, mean, std, resize, crop, input_format, client_steps,
                             embed_dim, image_input, text_input, output, normalized_output, opset,
                             variants ({"fp32"|"fp16"|"int8": {"image": file, "text": file or null}}),
                             tokenizer (null or {"type": "clip_bpe", "vocab_file", "context_length", ...}),
                             model (the training config card), parity (the export's agreement figures)
    bpe_simple_vocab_16e6.txt.gz   CLIP BPE merges, when the model has a text encoder

This module owns those names, the two input formats, the one reader and the one writer of
``preprocess.json``, the per-image input preparation and the one ``l2_normalize``. It imports neither
torch nor onnxruntime: the exporter (``export.onnx``), the runtime (``export.runtime``), extraction,
``index`` and ``app`` all use it. ``Preprocess`` (resize, centre-crop, mean/std) is defined in
``trainer.data.preprocess`` because training's evaluation uses the same recipe and ``trainer`` imports
nothing from ``export``; it is re-exported here.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from trainer.data.preprocess import Preprocess, preprocess_image, resize_center_crop

__all__ = [
    "Preprocess", "EncoderError", "l2_normalize", "read_preprocess", "write_preprocess", "make_preprocess_info",
    "variant_files", "declares_text", "int8_agreement", "describe_execution", "prepare_image", "empty_batch",
    "client_steps",
]

# -- file names -----------------------------------------------------------------------------------
IMAGE_MODEL = "image_encoder.onnx"
TEXT_MODEL = "text_encoder.onnx"
IMAGE_MODEL_FP16 = "image_encoder.fp16.onnx"
TEXT_MODEL_FP16 = "text_encoder.fp16.onnx"
IMAGE_MODEL_INT8 = "image_encoder.int8.onnx"
PREPROCESS = "preprocess.json"
INT8_REPORT = "int8_report.json"
VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"

# -- graph inputs and outputs ---------------------------------------------------------------------
IMAGE_INPUT = "pixels"     # float32 [N, C, H, W], normalised
UINT8_INPUT = "images"     # uint8 [N, H, W, C], resized and cropped; the graph normalises
TEXT_INPUT = "tokens"      # int64 [N, L]
OUTPUT = "embedding"       # float32 [N, D], not normalised
FLOAT_NCHW, UINT8_NHWC = "float32_nchw", "uint8_nhwc"
INPUT_FORMATS = (FLOAT_NCHW, UINT8_NHWC)
ONNX_INPUT_TYPES = {FLOAT_NCHW: "tensor(float)", UINT8_NHWC: "tensor(uint8)"}

# -- variants -------------------------------------------------------------------------------------
VARIANTS = ("fp32", "fp16", "int8")
EXPORT_FLAGS = {"fp16": "--fp16", "int8": "--int8 --calibration-data SHARDS"}
DEFAULT_FILES = {"image": IMAGE_MODEL, "text": TEXT_MODEL}


class EncoderError(RuntimeError):
    """An encoder directory that cannot be used (missing files, inconsistent metadata)."""


def l2_normalize(vectors: Any, dtype: Any = np.float32) -> np.ndarray:
    """Row-wise L2 normalisation of [N, D] ``vectors`` in ``dtype``; zero rows stay zero instead of NaN."""
    vectors = np.asarray(vectors, dtype=dtype)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(dtype, copy=False)


# -- preprocess.json ------------------------------------------------------------------------------


def preprocess_path(directory: str | os.PathLike) -> Path:
    return Path(directory) / PREPROCESS


def read_json_object(path: str | os.PathLike, error: type[Exception], what: str) -> dict:
    """The JSON object in ``path`` (``preprocess.json``, ``index.json``, ``embeddings.json``): ``FileNotFoundError``
    naming ``what`` when absent, ``error`` when it is not valid JSON or not an object."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {str(path)!r} does not exist")
    try:
        with open(path, encoding="utf-8") as handle:
            info = json.load(handle)
    except json.JSONDecodeError as problem:
        raise error(f"{path} is not valid JSON: {problem}") from problem
    if not isinstance(info, dict):
        raise error(f"{path} must hold a JSON object, found {type(info).__name__}")
    return info


def read_preprocess(directory: str | os.PathLike) -> dict:
    """The parsed ``preprocess.json`` of an encoder directory.

    Raises ``FileNotFoundError`` when it is absent and ``EncoderError`` when it is not a JSON object or
    names an unknown ``input_format``.
    """
    info = read_json_object(preprocess_path(directory), EncoderError, "encoder")
    input_format = info.get("input_format", FLOAT_NCHW)
    if input_format not in INPUT_FORMATS:
        raise EncoderError(f"{PREPROCESS} has input_format {input_format!r}; expected one of {INPUT_FORMATS}")
    return info


def write_preprocess(directory: str | os.PathLike, info: dict) -> Path:
    """Write ``info`` as ``directory/preprocess.json`` (the reader's inverse); returns the path."""
    path = preprocess_path(directory)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(info, handle, indent=2)
    return path


def client_steps(spec: Preprocess, input_format: str = FLOAT_NCHW) -> list[str]:
    """What a client must do to an image before the image encoder, in order (recorded in preprocess.json)."""
    mode = "grayscale (L)" if spec.channels == 1 else "RGB"
    size = spec.image_size
    steps = [
        f"decode the image and convert it to {mode}",
        f"resize so the shorter side is {size} px (bicubic)",
        f"centre-crop {size}x{size}",
    ]
    if input_format == UINT8_NHWC:
        steps.append(f"stack as uint8 [N, {size}, {size}, {spec.channels}] (NHWC, values 0-255) into input "
                     f"'{UINT8_INPUT}'; the graph scales and normalises")
    else:
        steps += [
            "scale to [0, 1] (divide by 255)",
            f"subtract mean {list(spec.mean)} and divide by std {list(spec.std)} per channel",
            f"transpose to float32 [N, {spec.channels}, {size}, {size}] (NCHW) into input '{IMAGE_INPUT}'",
        ]
    steps.append(f"L2-normalise the '{OUTPUT}' rows (the graph returns unnormalised embeddings)")
    return steps


def make_preprocess_info(
    spec: Preprocess, embed_dim: int, *, input_format: str = FLOAT_NCHW, has_text: bool = False,
    fp16: bool = False, int8: bool = False, tokenizer: dict | None = None, model: dict | None = None,
    opset: int | None = None,
) -> dict:
    """The ``preprocess.json`` contents of an export (``parity`` is added by the exporter once measured)."""
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"unknown input_format {input_format!r}; expected one of {INPUT_FORMATS}")
    text = TEXT_MODEL if has_text else None
    variants: dict[str, dict] = {"fp32": {"image": IMAGE_MODEL, "text": text}}
    if fp16:
        variants["fp16"] = {"image": IMAGE_MODEL_FP16, "text": TEXT_MODEL_FP16 if has_text else None}
    if int8:  # the text tower stays float32: queries are one short text at a time
        variants["int8"] = {"image": IMAGE_MODEL_INT8, "text": text}
    return {
        **spec.to_dict(),
        "input_format": input_format,
        "client_steps": client_steps(spec, input_format),
        "embed_dim": int(embed_dim),
        "image_input": UINT8_INPUT if input_format == UINT8_NHWC else IMAGE_INPUT,
        "text_input": TEXT_INPUT if has_text else None,
        "output": OUTPUT,
        "normalized_output": False,
        "opset": opset,
        "variants": variants,
        "tokenizer": tokenizer if has_text else None,
        "model": dict(model or {}),
    }


def variant_files(info: dict, variant: str) -> dict:
    """``{"image": file, "text": file or None}`` of ``variant`` (the fp32 names when none is recorded)."""
    recorded = (info.get("variants") or {}).get(variant) or {}
    return {**DEFAULT_FILES, **recorded}


def declares_text(info: dict) -> bool:
    """Whether ``preprocess.json`` describes a text encoder (image-text models)."""
    return bool(info.get("tokenizer"))


def int8_agreement(info: dict) -> float | None:
    """The int8 variant's min cosine to float32 on the export's held-out images, when recorded."""
    held_out = (((info.get("parity") or {}).get("image_int8") or {}).get("held_out") or {})
    value = held_out.get("min_cosine")
    return float(value) if isinstance(value, (int, float)) else None


def describe_execution(variant: str | None, provider: str | None) -> str:
    """E.g. ``"int8 variant on CPUExecutionProvider"``: what logs, summaries and the app show."""
    return f"{variant or 'unknown'} variant on {provider or 'an unknown provider'}"


# -- image inputs ---------------------------------------------------------------------------------


def prepare_image(image: Any, spec: Preprocess, input_format: str = FLOAT_NCHW) -> np.ndarray:
    """One PIL image -> the image encoder's per-image input: float32 [C, H, W] normalised
    (``float32_nchw``) or uint8 [H, W, C] resized and cropped (``uint8_nhwc``)."""
    if input_format == FLOAT_NCHW:
        return preprocess_image(image, spec)
    if input_format != UINT8_NHWC:
        raise ValueError(f"unknown input_format {input_format!r}; expected one of {INPUT_FORMATS}")
    image = resize_center_crop(image.convert("L" if spec.channels == 1 else "RGB"), spec.image_size)
    array = np.asarray(image, dtype=np.uint8)
    return np.ascontiguousarray(array[:, :, None] if array.ndim == 2 else array)


def empty_batch(spec: Preprocess, input_format: str = FLOAT_NCHW) -> np.ndarray:
    """A batch of no images in ``input_format``."""
    size, channels = spec.image_size, spec.channels
    if input_format == UINT8_NHWC:
        return np.zeros((0, size, size, channels), dtype=np.uint8)
    return np.zeros((0, channels, size, size), dtype=np.float32)


def input_dtype(input_format: str) -> Any:
    return np.uint8 if input_format == UINT8_NHWC else np.float32


def input_shape(spec: Preprocess, input_format: str) -> tuple[str, Sequence[int]]:
    """The per-image layout and sizes of ``input_format``: ``("[N, H, W, C]", (H, W, C))`` or NCHW."""
    if input_format == UINT8_NHWC:
        return "[N, H, W, C]", (spec.image_size, spec.image_size, spec.channels)
    return "[N, C, H, W]", (spec.channels, spec.image_size, spec.image_size)


class ParityError(RuntimeError):
    """An exported graph disagrees with eager PyTorch beyond tolerance (the ONNX encoders, CoCa's caption graphs)."""
