"""Export of CoCa's caption graphs (the torch side of ``export/captions.py``), called by ``export.onnx``.

Two graphs, each traced at batch 2 with a dynamic batch axis and checked against eager PyTorch on fresh inputs
at another batch size: the image side (the image encoder's input -> the decoder's image tokens) and one decoder
step (image tokens + padded token prefix + the prefix's last position -> next-token logits). The step's reference
is open_clip's own ``CoCa`` forward (text tower, then the whole multimodal decoder, then the row's last position);
the graph gathers the last position before the vocabulary projection, so the check covers that rewrite too.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from torch import nn

from export.contract import IMAGE_INPUT, UINT8_INPUT, ParityError
from export.captions import (
    CAPTION_DECODER_MODEL, CAPTION_IMAGE_MODEL, IMAGE_TOKENS, LOGITS, POSITIONS, TOKENS, captioner_info,
)

TOLERANCE = 1e-4  # max abs difference, relative to the largest eager value (at least 1)


class CaptionImage(nn.Module):
    """The image encoder's input -> CoCa's image tokens [N, T, D] (its visual tower's token output).

    ``uint8_input``: uint8 [N, H, W, C] scaled and normalised in the graph as the uint8 image encoder does."""

    def __init__(self, coca: nn.Module, mean, std, uint8_input: bool):
        super().__init__()
        self.coca, self.uint8_input = coca, uint8_input
        std_t, mean_t = torch.tensor(std, dtype=torch.float32), torch.tensor(mean, dtype=torch.float32)
        self.register_buffer("scale", (1.0 / (255.0 * std_t)).view(1, -1, 1, 1))
        self.register_buffer("shift", (-mean_t / std_t).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.uint8_input:
            images = images.permute(0, 3, 1, 2).to(torch.float32) * self.scale + self.shift
        return self.coca.visual(images)[1]


class CaptionStep(nn.Module):
    """One greedy step: (image tokens [N, T, D], tokens int64 [N, L], positions int64 [N]) -> logits [N, V] of the
    token after ``tokens[n, positions[n]]``. The decoder's layers are open_clip's ``MultimodalTransformer`` run in
    its order; the vocabulary projection is applied to the one position needed, not to all L."""

    def __init__(self, coca: nn.Module):
        super().__init__()
        self.coca = coca

    def forward(self, image_tokens: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        decoder = self.coca.text_decoder
        x = self.coca.text(tokens)[1]  # [N, L, D]: the unimodal tower's token outputs (class token dropped)
        length = x.shape[1]
        for block, cross in zip(decoder.resblocks, decoder.cross_attn):
            x = block(x, attn_mask=decoder.attn_mask[:length, :length])
            x = cross(x, k_x=image_tokens, v_x=image_tokens)
        last = x.gather(1, positions.view(-1, 1, 1).expand(-1, 1, x.shape[-1])).squeeze(1)
        return decoder.ln_final(last) @ decoder.text_projection


def eager_step_logits(coca: nn.Module, image_tokens: torch.Tensor, tokens: torch.Tensor,
                      positions: torch.Tensor) -> torch.Tensor:
    """The reference for ``CaptionStep``: open_clip's text tower and whole decoder, then each row's position."""
    logits = coca.text_decoder(image_tokens, coca.text(tokens)[1])
    return logits[torch.arange(len(positions)), positions]


def _export(module: nn.Module, inputs: tuple, names: list[str], output: str, path: str, opset: int) -> None:
    import onnx

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused MHA op does not export (as export.onnx)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module.eval(), inputs, path, input_names=names, output_names=[output],
                              dynamic_axes={**{name: {0: "batch"} for name in names}, output: {0: "batch"}},
                              opset_version=opset, dynamo=False, do_constant_folding=True)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    onnx.checker.check_model(onnx.load(path))


def _compare(name: str, eager: torch.Tensor, onnx_out: np.ndarray, tolerance: float) -> dict:
    """Max abs difference relative to the largest eager value (at least 1), and the min cosine of each image's
    outputs (flattened), the figure ``python -m export`` prints for every graph."""
    reference = eager.float().numpy()
    scale = max(1.0, float(np.abs(reference).max()))
    diff = float(np.abs(reference - onnx_out).max()) / scale
    if not diff <= tolerance:
        raise ParityError(f"{name}: max abs diff {diff:.3g} (relative to {scale:.3g}) > {tolerance:g}; "
                          f"the export is not faithful")
    a = reference.reshape(len(reference), -1).astype(np.float64)
    b = onnx_out.reshape(len(onnx_out), -1).astype(np.float64)
    cosine = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    report = {"max_abs_diff": diff, "min_cosine": float(cosine.min()), "batch": int(reference.shape[0])}
    if reference.ndim == 2:  # logits: the greedy choice must agree as well
        report["argmax_agreement"] = float((reference.argmax(1) == onnx_out.argmax(1)).mean())
    return report


def _prefixes(batch: int, length: int, vocab: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Start token + a random body of random length, zero padded; and each row's last position."""
    tokens = torch.zeros(batch, length, dtype=torch.int64)
    positions = torch.randint(0, length, (batch,), generator=generator)
    for row in range(batch):
        tokens[row, 0] = vocab - 2
        body = int(positions[row])
        tokens[row, 1:body + 1] = torch.randint(1, vocab - 2, (body,), generator=generator)
    return tokens, positions


def export_captioner(model, staging: str, image_inputs, opset: int, generator: torch.Generator,
                     uint8_input: bool = False, tolerance: float = TOLERANCE) -> tuple[dict, dict]:
    """Write ``caption_image.onnx`` and ``caption_decoder.onnx`` of the CoCa ``model`` (an ``EmbeddingModel``)
    into ``staging``; returns (the ``captioner`` entry of preprocess.json, the parity report).

    ``image_inputs(batch)``: random inputs in the image encoder's format. Raises ``export.onnx.ParityError``."""
    import onnxruntime as ort

    from export.runtime import session_options

    coca, config = model.coca, model.config
    image = CaptionImage(coca, config.mean, config.std, uint8_input).eval()
    image_name = UINT8_INPUT if uint8_input else IMAGE_INPUT
    image_path = os.path.join(staging, CAPTION_IMAGE_MODEL)
    _export(image, (image_inputs(2),), [image_name], IMAGE_TOKENS, image_path, opset)
    check = image_inputs(5)
    with torch.no_grad():
        if uint8_input:  # the textbook (x / 255 - mean) / std as the reference of the fused form
            mean = torch.tensor(config.mean).view(1, -1, 1, 1)
            std = torch.tensor(config.std).view(1, -1, 1, 1)
            eager_tokens = coca.visual((check.permute(0, 3, 1, 2).float() / 255.0 - mean) / std)[1]
        else:
            eager_tokens = coca.visual(check)[1]
    options = session_options(threads=None)
    session = ort.InferenceSession(image_path, sess_options=options, providers=["CPUExecutionProvider"])
    report = {"caption_image": _compare(CAPTION_IMAGE_MODEL, eager_tokens,
                                        session.run([IMAGE_TOKENS], {image_name: check.numpy()})[0], tolerance)}

    length, vocab = config.text.context_length, config.text.vocab_size
    step = CaptionStep(coca).eval()
    decoder_path = os.path.join(staging, CAPTION_DECODER_MODEL)
    with torch.no_grad():
        trace_tokens = image(image_inputs(2))
    _export(step, (trace_tokens, *_prefixes(2, length, vocab, generator)), [IMAGE_TOKENS, TOKENS, POSITIONS], LOGITS,
            decoder_path, opset)
    tokens, positions = _prefixes(5, length, vocab, generator)
    with torch.no_grad():
        eager_logits = eager_step_logits(coca, eager_tokens, tokens, positions)
    session = ort.InferenceSession(decoder_path, sess_options=options, providers=["CPUExecutionProvider"])
    feeds = {IMAGE_TOKENS: eager_tokens.numpy(), TOKENS: tokens.numpy(), POSITIONS: positions.numpy()}
    report["caption_decoder"] = _compare(CAPTION_DECODER_MODEL, eager_logits, session.run([LOGITS], feeds)[0],
                                         tolerance)
    return captioner_info(length, vocab, image_name), report
