"""Export a saved model to ONNX, checking the result against eager PyTorch before declaring success.

Writes into the output directory the encoder directory of ``export/contract.py`` (the one place that
describes it): ``image_encoder.onnx`` (``text_encoder.onnx`` for image-text models), with ``fp16`` the
``*.fp16.onnx`` variants for GPUs, with ``int8`` ``image_encoder.int8.onnx`` calibrated on images read from
shards (``export/quantize.py``) plus ``int8_report.json`` (the export fails, leaving the output as it was,
when int8 cannot meet ``min_cosine``), ``preprocess.json`` and the BPE vocabulary; for a ``coca`` model also
``caption_image.onnx`` and ``caption_decoder.onnx`` (``export/caption_export.py``, read by ``export/captions.py``).

Every graph is traced at batch 2 with a dynamic batch axis, exported at a fixed opset, passed through
``onnx.checker`` and compared with eager PyTorch on fresh random inputs at another batch size
(fp32: max abs diff of L2-normalised embeddings <= ``tolerance``; fp16: min cosine >= ``FP16_MIN_COSINE``).
Files are written to a staging directory and moved into place only when every check passes.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from export.contract import (
    FLOAT_NCHW, IMAGE_INPUT, IMAGE_MODEL, IMAGE_MODEL_FP16, INT8_REPORT, OUTPUT, TEXT_INPUT, TEXT_MODEL, TEXT_MODEL_FP16,
    UINT8_INPUT, UINT8_NHWC, VOCAB_NAME, ParityError, Preprocess, l2_normalize, make_preprocess_info,
    write_preprocess,
)

log = logging.getLogger("manyview.export")

OPSET = 17
FP32_TOLERANCE = 1e-4
FP16_MIN_COSINE = 0.999
TRACE_BATCH, CHECK_BATCH = 2, 5


@dataclass
class Parity:
    """Agreement of ONNX Runtime and eager PyTorch on fresh random inputs (normalised embeddings)."""

    max_abs_diff: float
    min_cosine: float
    batch: int

    def to_dict(self) -> dict:
        return {"max_abs_diff": self.max_abs_diff, "min_cosine": self.min_cosine, "batch": self.batch}


class _ImageEncoder(nn.Module):
    """Normalised float pixels [N, C, H, W] -> embedding."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)


class _Uint8ImageEncoder(nn.Module):
    """uint8 images [N, H, W, C] (resized and cropped by the client) -> embedding.

    Scaling and mean/std normalisation live in the graph as one multiply-add per channel
    ((x / 255 - mean) / std == x * scale + shift), so clients in any language only decode and resize.
    """

    def __init__(self, model, mean, std):
        super().__init__()
        self.model = model
        std_t = torch.tensor(std, dtype=torch.float32)
        mean_t = torch.tensor(mean, dtype=torch.float32)
        self.register_buffer("scale", (1.0 / (255.0 * std_t)).view(1, -1, 1, 1))
        self.register_buffer("shift", (-mean_t / std_t).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.permute(0, 3, 1, 2).to(torch.float32) * self.scale + self.shift
        return self.model.encode_image(pixels)


class _TextEncoder(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)


def export_graph(module: nn.Module, example: torch.Tensor, input_name: str, path: str, opset: int = OPSET) -> None:
    """Trace ``module`` on ``example`` (batch >= 2) with a dynamic batch axis; check with ``onnx.checker``."""
    import onnx

    if example.shape[0] < 2:
        # At batch 1 the tracer may bake the batch size into reshapes; the dynamic axis would then lie.
        raise ValueError(f"trace at batch >= 2, got {example.shape[0]}")
    module.eval()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # nn.MultiheadAttention's eval fast path is one fused op (aten::_native_multi_head_attention) that the
    # exporter cannot express; the standard path traces into plain matmul/softmax ops with the same numbers.
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript exporter deprecation and tracer warnings
            torch.onnx.export(
                module, (example,), path, input_names=[input_name], output_names=[OUTPUT],
                dynamic_axes={input_name: {0: "batch"}, OUTPUT: {0: "batch"}},
                opset_version=opset, dynamo=False, do_constant_folding=True,
            )
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    onnx.checker.check_model(onnx.load(path))


def convert_fp16(source: str, target: str) -> None:
    """Write a float16 copy of the graph at ``source`` (weights and compute; inputs/outputs stay as they are)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(source), keep_io_types=True)
    _topological_sort(model.graph)  # the converter appends the input casts at the end of the node list
    onnx.checker.check_model(model)
    onnx.save(model, target)


def _topological_sort(graph) -> None:
    """Reorder ``graph.node`` in place so every node comes after the producers of its inputs."""
    available = {value.name for value in graph.input} | {init.name for init in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [node for node in pending if all(name in available for name in node.input)]
        if not ready:
            raise ValueError("the float16 graph has a cycle or an input no node produces")
        for node in ready:
            available.update(node.output)
        ready_ids = {id(node) for node in ready}
        pending = [node for node in pending if id(node) not in ready_ids]
        ordered.extend(ready)
    copies = [type(node)() for node in ordered]
    for copy, node in zip(copies, ordered):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


def compare(reference: np.ndarray, candidate: np.ndarray) -> Parity:
    """Max abs difference and min cosine of the L2-normalised rows of two [N, D] arrays."""
    a, b = l2_normalize(reference, np.float64), l2_normalize(candidate, np.float64)
    return Parity(max_abs_diff=float(np.abs(a - b).max()), min_cosine=float((a * b).sum(axis=1).min()), batch=len(a))


def check_parity(
    module: nn.Module, path: str, inputs: torch.Tensor, tolerance: float = FP32_TOLERANCE,
    min_cosine: float | None = None,
) -> Parity:
    """Run ``inputs`` through eager ``module`` and the ONNX file on ONNX Runtime's CPU provider.

    Raises ``ParityError`` when the max abs diff exceeds ``tolerance`` or, if given, the min cosine is
    below ``min_cosine`` (the fp16 criterion; then ``tolerance`` is not applied).
    """
    import onnxruntime as ort

    from export.runtime import session_options

    # The runtime's own session options, so the check covers the graph as it will be optimised and run.
    options = session_options(threads=None, fp16=min_cosine is not None)
    session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    with torch.no_grad():
        eager = module(inputs).float().numpy()
    parity = compare(eager, session.run([OUTPUT], {input_name: inputs.numpy()})[0])
    name = os.path.basename(path)
    if min_cosine is not None:
        if not parity.min_cosine >= min_cosine:
            raise ParityError(f"{name}: min cosine {parity.min_cosine:.6f} < {min_cosine} "
                              f"(max abs diff {parity.max_abs_diff:.3g}); the export is not faithful")
    elif not parity.max_abs_diff <= tolerance:
        raise ParityError(f"{name}: max abs diff {parity.max_abs_diff:.3g} > {tolerance:g} "
                          f"(min cosine {parity.min_cosine:.6f}); the export is not faithful")
    return parity


def preprocess_info(saved: dict, model, has_text: bool, uint8_input: bool = False, fp16: bool = False,
                    int8: bool = False) -> dict:
    """The ``preprocess.json`` contents for ``model`` (the schema: ``export.contract.make_preprocess_info``)."""
    config = model.config
    tokenizer = None
    if has_text:
        tokenizer = {
            "type": "clip_bpe", "vocab_file": VOCAB_NAME, "context_length": config.text.context_length,
            "source": "open_clip's bundled BPE (bpe_simple_vocab_16e6), lower-cased, ftfy + whitespace cleaning",
            "start_token": config.text.vocab_size - 2, "end_token": config.text.vocab_size - 1, "pad_token": 0,
            "truncate": "rows longer than context_length are cut to context_length and the last position set to end_token",
        }
    return make_preprocess_info(
        Preprocess.of_model(config), model.embed_dim, input_format=UINT8_NHWC if uint8_input else FLOAT_NCHW, has_text=has_text,
        fp16=fp16, int8=int8, tokenizer=tokenizer, model={k: v for k, v in saved.items() if k != "model"},
        opset=OPSET,
    )


def _image_inputs(batch: int, config, uint8_input: bool, generator: torch.Generator) -> torch.Tensor:
    size, channels = config.image_size, config.channels
    if uint8_input:
        return torch.randint(0, 256, (batch, size, size, channels), dtype=torch.uint8, generator=generator)
    return torch.randn(batch, channels, size, size, generator=generator)


class _FloatReference(nn.Module):
    """Eager reference for the uint8 graph: the textbook (x / 255 - mean) / std, not the fused form."""

    def __init__(self, model, mean, std):
        super().__init__()
        self.model = model
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = (images.permute(0, 3, 1, 2).to(torch.float32) / 255.0 - self.mean) / self.std
        return self.model.encode_image(pixels)


def export_model(
    model_dir: str, output_dir: str, opset: int = OPSET, tolerance: float = FP32_TOLERANCE, seed: int = 0,
    uint8_input: bool = False, fp16: bool = False, fp16_min_cosine: float = FP16_MIN_COSINE,
    int8: bool = False, calibration_data: str | None = None, calibration_size: int = 512,
    calibration_method: str = "auto", min_cosine: float = 0.99, held_out_size: int = 256,
) -> dict:
    """Export ``model_dir`` (a ``RUN/model``) to ``output_dir``; returns the parity report
    ``{"image": {...}, "text": {...}, "image_fp16": {...}, "text_fp16": {...}, "image_int8": {...}}``
    (towers and variants present only; ``image_int8`` is the int8 report, see ``export.quantize``).

    Raises ``FileNotFoundError`` for a model directory without config or weights, ``ParityError``
    when a graph disagrees with eager PyTorch and ``export.quantize.CalibrationError`` when the int8
    encoder cannot meet ``min_cosine`` on held-out images; ``output_dir`` is then left as it was.
    """
    if int8 and not calibration_data:
        raise ValueError("--int8 needs --calibration-data: shards whose images calibrate the activation ranges")
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
        if uint8_input:
            image = _Uint8ImageEncoder(model, config.mean, config.std).eval()
            reference = _FloatReference(model, config.mean, config.std).eval()
            input_name = UINT8_INPUT
        else:
            image = reference = _ImageEncoder(model).eval()
            input_name = IMAGE_INPUT
        image_path = os.path.join(staging, IMAGE_MODEL)
        export_graph(image, _image_inputs(TRACE_BATCH, config, uint8_input, generator), input_name, image_path, opset)
        # Fresh inputs at another batch size: checks the dynamic axis as well as the numbers.
        check_inputs = _image_inputs(CHECK_BATCH, config, uint8_input, generator)
        report["image"] = check_parity(reference, image_path, check_inputs, tolerance).to_dict()
        if fp16:
            fp16_path = os.path.join(staging, IMAGE_MODEL_FP16)
            convert_fp16(image_path, fp16_path)
            report["image_fp16"] = check_parity(reference, fp16_path, check_inputs, min_cosine=fp16_min_cosine).to_dict()
        if model.text is not None:
            text = _TextEncoder(model).eval()
            text_path = os.path.join(staging, TEXT_MODEL)
            length, vocab = config.text.context_length, config.text.vocab_size
            export_graph(text, _random_tokens(TRACE_BATCH, length, vocab, generator), TEXT_INPUT, text_path, opset)
            tokens = _random_tokens(CHECK_BATCH, length, vocab, generator)
            report["text"] = check_parity(text, text_path, tokens, tolerance).to_dict()
            if fp16:
                fp16_path = os.path.join(staging, TEXT_MODEL_FP16)
                convert_fp16(text_path, fp16_path)
                report["text_fp16"] = check_parity(text, fp16_path, tokens, min_cosine=fp16_min_cosine).to_dict()
            shutil.copyfile(bpe_vocab_path(), os.path.join(staging, VOCAB_NAME))
        captioner = None
        if getattr(model, "coca", None) is not None:  # CoCa: the graphs greedy captioning needs (export/captions.py)
            from export.caption_export import export_captioner

            captioner, caption_report = export_captioner(
                model, staging, lambda batch: _image_inputs(batch, config, uint8_input, generator), opset, generator,
                uint8_input=uint8_input)
            report.update(caption_report)
        info = preprocess_info(saved, model, model.text is not None, uint8_input=uint8_input, fp16=fp16, int8=int8)
        info["opset"] = opset
        if captioner is not None:
            info["captioner"] = captioner
        if int8:
            from export.quantize import quantize_encoder

            int8_report = quantize_encoder(staging, info, calibration_data, calibration_size=calibration_size,
                                           min_cosine=min_cosine, method=calibration_method,
                                           held_out_size=held_out_size)
            with open(os.path.join(staging, INT8_REPORT), "w", encoding="utf-8") as handle:
                json.dump(int8_report, handle, indent=2)
            report["image_int8"] = {key: int8_report[key] for key in ("method", "held_out", "calibration")}
        info["parity"] = report
        write_preprocess(staging, info)
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
