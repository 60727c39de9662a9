"""Export a saved model to ONNX, checking the result against eager PyTorch before declaring success.

Writes ``image_encoder.onnx`` (input ``pixels`` float32 [N, C, H, W] -> ``embedding`` [N, D]),
``text_encoder.onnx`` for image-text models (input ``tokens`` int64 [N, L]), ``preprocess.json`` and the
BPE vocabulary the text encoder's tokenizer needs. Every file is written to a staging directory first and
moved into place only after the parity check passes.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

log = logging.getLogger("manyview.export")

OPSET = 17
IMAGE_INPUT, TEXT_INPUT, OUTPUT = "pixels", "tokens", "embedding"
VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"


class ParityError(RuntimeError):
    """The exported graph disagrees with eager PyTorch beyond tolerance."""


@dataclass
class Parity:
    """Agreement of ONNX Runtime and eager PyTorch on fresh random inputs (normalised embeddings)."""

    max_abs_diff: float
    min_cosine: float
    batch: int

    def to_dict(self) -> dict:
        return {"max_abs_diff": self.max_abs_diff, "min_cosine": self.min_cosine, "batch": self.batch}


class _ImageEncoder(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)


class _TextEncoder(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)


def _export_graph(module: nn.Module, example: torch.Tensor, input_name: str, path: str, opset: int) -> None:
    """Trace at batch >= 2 with a dynamic batch axis and check the graph with ``onnx.checker``."""
    import onnx

    module.eval()
    with torch.no_grad():
        torch.onnx.export(
            module, (example,), path, input_names=[input_name], output_names=[OUTPUT],
            dynamic_axes={input_name: {0: "batch"}, OUTPUT: {0: "batch"}},
            opset_version=opset, dynamo=False, do_constant_folding=True,
        )
    onnx.checker.check_model(onnx.load(path))


def _normalise(array: np.ndarray) -> np.ndarray:
    return array / np.maximum(np.linalg.norm(array, axis=1, keepdims=True), 1e-12)


def check_parity(module: nn.Module, path: str, inputs: torch.Tensor, tolerance: float = 1e-4) -> Parity:
    """Run ``inputs`` through eager ``module`` and the ONNX file; raise ``ParityError`` over ``tolerance``."""
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    with torch.no_grad():
        eager = _normalise(module(inputs).float().numpy())
    onnx_out = _normalise(session.run([OUTPUT], {input_name: inputs.numpy()})[0])
    parity = Parity(
        max_abs_diff=float(np.abs(eager - onnx_out).max()),
        min_cosine=float((eager * onnx_out).sum(axis=1).min()),
        batch=int(inputs.shape[0]),
    )
    if not parity.max_abs_diff <= tolerance:
        raise ParityError(f"{os.path.basename(path)}: max abs diff {parity.max_abs_diff:.3g} > {tolerance:g} "
                          f"(min cosine {parity.min_cosine:.6f}); the export is not faithful")
    return parity


def preprocess_info(saved: dict, model, has_text: bool) -> dict:
    config = model.config
    return {
        "image_size": config.image_size,
        "channels": config.channels,
        "mean": list(config.mean),
        "std": list(config.std),
        "resize": "bicubic",
        "crop": "center",
        "embed_dim": model.embed_dim,
        "image_input": IMAGE_INPUT,
        "text_input": TEXT_INPUT if has_text else None,
        "output": OUTPUT,
        "opset": OPSET,
        "tokenizer": (
            {"type": "clip_bpe", "vocab_file": VOCAB_NAME, "context_length": config.text.context_length}
            if has_text else None
        ),
        "model": {k: v for k, v in saved.items() if k not in ("model",)},
    }


def export_model(model_dir: str, output_dir: str, opset: int = OPSET, tolerance: float = 1e-4, seed: int = 0) -> dict:
    """Export ``model_dir`` (a ``RUN/model``) to ``output_dir``; returns the parity report."""
    from trainer.models import bpe_vocab_path, load_model

    model, saved = load_model(model_dir)
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    output_dir = os.path.abspath(output_dir)
    os.makedirs(os.path.dirname(output_dir), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".onnx-", dir=os.path.dirname(output_dir))
    os.chmod(staging, 0o755)  # mkdtemp makes it private; the result is an ordinary directory
    report: dict = {}
    try:
        size, channels = config.image_size, config.channels
        image = _ImageEncoder(model).eval()
        image_path = os.path.join(staging, "image_encoder.onnx")
        _export_graph(image, torch.randn(2, channels, size, size, generator=generator), IMAGE_INPUT, image_path, opset)
        # Fresh inputs at another batch size: checks the dynamic axis as well as the numbers.
        report["image"] = check_parity(image, image_path, torch.randn(5, channels, size, size, generator=generator), tolerance).to_dict()
        if model.text is not None:
            text = _TextEncoder(model).eval()
            text_path = os.path.join(staging, "text_encoder.onnx")
            length, vocab = config.text.context_length, config.text.vocab_size
            _export_graph(text, _random_tokens(2, length, vocab, generator), TEXT_INPUT, text_path, opset)
            report["text"] = check_parity(text, text_path, _random_tokens(5, length, vocab, generator), tolerance).to_dict()
            shutil.copyfile(bpe_vocab_path(), os.path.join(staging, VOCAB_NAME))
        info = preprocess_info(saved, model, model.text is not None)
        info["parity"] = report
        with open(os.path.join(staging, "preprocess.json"), "w", encoding="utf-8") as handle:
            json.dump(info, handle, indent=2)
        if os.path.exists(output_dir):
            shutil.rmtree(output_dir)
        os.replace(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _random_tokens(batch: int, length: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Token rows shaped like real ones: start token, random body of random length, end token, zero padding."""
    tokens = torch.zeros(batch, length, dtype=torch.int64)
    for row in range(batch):
        body = int(torch.randint(1, length - 1, (1,), generator=generator))
        tokens[row, 0] = vocab - 2  # <start_of_text>
        tokens[row, 1:body] = torch.randint(1, vocab - 2, (body - 1,), generator=generator)
        tokens[row, body] = vocab - 1  # <end_of_text>: the argmax the tower pools at
    return tokens
