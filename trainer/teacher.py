"""Frozen teachers for distillation (``trainer/objectives/distill.py``): what the user points ``teacher=PATH`` at.

Three kinds of path, told apart by what they hold:

* an exported manyview ONNX encoder directory (``python -m export``; has ``preprocess.json``): run by onnxruntime
  through ``export.runtime.Encoder`` (fp32 variant), so the teacher itself needs no torch and can come from any
  run, of any backbone, in any input format (``float32_nchw`` or ``uint8_nhwc``);
* a manyview ``RUN/model`` directory (``config.json`` + ``model.safetensors``): ``trainer.models.load_model``;
* a local weights file written by timm, torchvision or open_clip (or a manyview checkpoint directory): needs the
  teacher's backbone name (``teacher_backbone``) and loads, strictly, with ``trainer.init_from.load_initial_weights``
  into ``EmbeddingModel(ModelConfig(backbone, image_size))``.

Every teacher keeps its own input contract: it takes the student's view as pixels in [0, 1] (float [N, C, H, W],
on the training device), resizes them to its own image size when that differs (bilinear, antialiased) and
applies its own normalisation (mean/std, or uint8 NHWC for a ``uint8_nhwc`` encoder), and returns its raw
embeddings [N, D] as float32 on the same device, without gradient.

A torch teacher is held outside the objective's module tree on purpose: it is not in ``parameters()`` (never in the
optimizer), not in ``state_dict()`` (not in checkpoints, not in ``RUN/model``), not switched to training mode by
``objective.train()`` (its batch norms keep their statistics) and not converted to global batch norm. It is moved
to the input's device on first use. Every failure to load one is a ``ValueError`` that names the path and says
what was expected, raised when the objective is built.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ONNX_MARKER = "preprocess.json"
MODEL_FILES = ("config.json", "model.safetensors")
ACCEPTED = ("an exported ONNX encoder directory (python -m export; it holds preprocess.json), a manyview RUN/model "
            "directory (config.json + model.safetensors), or a local timm / torchvision / open_clip weights file "
            "(.safetensors, .pt, .pth, .bin) together with --set teacher_backbone=NAME")


@dataclass
class TeacherInput:
    """The input contract of a teacher: the image size, channels and normalisation it was trained with."""

    image_size: int
    channels: int
    mean: list[float]
    std: list[float]
    uint8: bool = False  # uint8 [N, H, W, C] pixels 0-255 (the graph normalises) instead of normalised float NCHW


class Teacher:
    """A frozen image encoder: ``teacher(pixels [N, C, H, W] in [0, 1]) -> raw embeddings [N, dim]``."""

    kind = ""

    def __init__(self, source: str, contract: TeacherInput, dim: int):
        self.source, self.contract, self.dim = source, contract, int(dim)

    def prepare(self, pixels: torch.Tensor) -> torch.Tensor:
        """The student's view as this teacher's input: resized to its image size, then normalised its way."""
        contract = self.contract
        if pixels.shape[-2:] != (contract.image_size, contract.image_size):
            pixels = F.interpolate(pixels, size=(contract.image_size, contract.image_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        if contract.uint8:
            return (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
        mean = torch.tensor(contract.mean, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
        std = torch.tensor(contract.std, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
        return (pixels - mean) / std

    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dim() != 4 or pixels.shape[1] != self.contract.channels:
            raise ValueError(f"teacher {self.source!r} takes {self.contract.channels}-channel images [N, C, H, W], "
                             f"got {tuple(pixels.shape)}")
        embeddings = self.encode(self.prepare(pixels.detach().float()))
        if embeddings.dim() != 2 or embeddings.shape != (pixels.shape[0], self.dim):
            raise ValueError(f"teacher {self.source!r} returned embeddings of shape {tuple(embeddings.shape)}, "
                             f"expected [{pixels.shape[0]}, {self.dim}]")
        return embeddings.to(device=pixels.device, dtype=torch.float32)

    def card(self) -> dict:
        """What the distilled model's card says about its teacher."""
        contract = self.contract
        return {"teacher": self.source, "teacher_format": self.kind, "teacher_dim": self.dim,
                "teacher_image_size": contract.image_size, "teacher_mean": list(contract.mean),
                "teacher_std": list(contract.std), "teacher_uint8_input": contract.uint8}


class OnnxTeacher(Teacher):
    """An exported encoder directory run by onnxruntime (``export.runtime.Encoder``, fp32 variant)."""

    kind = "onnx"

    def __init__(self, directory: str):
        from export.contract import UINT8_NHWC
        from export.runtime import Encoder, EncoderError

        try:
            # LOCAL_RANK: each process of a multi-GPU run puts its session on its own GPU (when onnxruntime has one).
            # torch's thread count: the teacher runs between the student's passes, in the same process, and
            # onnxruntime's default (every core) would oversubscribe the CPU when several processes train.
            self.encoder = Encoder(directory, precision="fp32", threads=torch.get_num_threads(),
                                   device_id=int(os.environ.get("LOCAL_RANK", 0)))
        except (EncoderError, FileNotFoundError, ValueError) as error:
            raise ValueError(f"teacher {directory!r} is not a usable exported ONNX encoder: {error}") from None
        spec = self.encoder.preprocess
        contract = TeacherInput(int(spec.image_size), int(spec.channels), list(spec.mean), list(spec.std),
                                uint8=self.encoder.input_format == UINT8_NHWC)
        super().__init__(directory, contract, self.encoder.dim)

    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        array = self.encoder.encode_batch(inputs.cpu().numpy(), batch_size=max(1, inputs.shape[0]), normalize=False)
        return torch.from_numpy(array)


class TorchTeacher(Teacher):
    """A manyview ``EmbeddingModel`` in eval mode with every parameter frozen, run under ``torch.no_grad``."""

    kind = "torch"

    def __init__(self, source: str, model, kind: str):
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.model, self.kind = model, kind
        config = model.config
        super().__init__(source, TeacherInput(int(config.image_size), int(config.channels), list(config.mean),
                                              list(config.std)), model.embed_dim)

    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        first = next(self.model.parameters(), None)
        if first is not None and first.device != inputs.device:
            self.model.to(inputs.device)
        return self.model.encode_image(inputs)


def load_teacher(path: str, backbone: str | None = None, image_size: int | None = None, channels: int = 3,
                 student_image_size: int = 32) -> Teacher:
    """The frozen teacher at ``path`` (see the module docstring). ``backbone`` and ``image_size`` describe a weights
    file's model (``image_size`` defaults to ``student_image_size``); for a directory, which says its own, they may
    only restate it. ``channels``: the student's, which the teacher must share. The teacher is run once on two
    blank images, so a broken one fails here and not at the first step."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"teacher must be a path: {ACCEPTED}; got {path!r}")
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise ValueError(f"teacher {path!r} does not exist; give {ACCEPTED}")
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, ONNX_MARKER)):
        if backbone is not None:
            raise ValueError(f"teacher {path!r} is an exported ONNX encoder, which carries its own architecture; "
                             f"drop teacher_backbone ({backbone!r})")
        teacher: Teacher = OnnxTeacher(path)
    elif os.path.isdir(path) and all(os.path.isfile(os.path.join(path, name)) for name in MODEL_FILES):
        teacher = _run_model_teacher(path, backbone)
    elif backbone is not None:
        teacher = _weights_file_teacher(path, backbone, image_size or student_image_size, channels)
    elif os.path.isdir(path):
        hint = ""
        if all(os.path.isfile(os.path.join(path, "model", name)) for name in MODEL_FILES):
            hint = f" (it holds a run: did you mean {os.path.join(path, 'model')!r}?)"
        raise ValueError(f"teacher {path!r} is a directory with neither {ONNX_MARKER} nor {' + '.join(MODEL_FILES)}"
                         f"{hint}; give {ACCEPTED}")
    else:
        raise ValueError(f"teacher {path!r} is a weights file: say which backbone it was written for with "
                         f"--set teacher_backbone=NAME (e.g. resnet18, timm:<name>, open_clip:<name>)")
    if image_size is not None and teacher.kind != "weights" and image_size != teacher.contract.image_size:
        raise ValueError(f"teacher_image_size={image_size} but the teacher {path!r} was made for "
                         f"{teacher.contract.image_size} px images; drop teacher_image_size")
    if teacher.contract.channels != channels:
        raise ValueError(f"teacher {path!r} takes {teacher.contract.channels}-channel images but the student's "
                         f"are {channels}-channel; both must see the same images")
    _probe(teacher)
    return teacher


def _run_model_teacher(path: str, backbone: str | None) -> TorchTeacher:
    from trainer.models import load_model

    try:
        model, saved = load_model(path)
    except Exception as error:  # noqa: BLE001 - any failure to rebuild the saved model is the user's bad path
        raise ValueError(f"teacher {path!r} looks like a RUN/model directory but does not load: {error}") from None
    if backbone is not None and backbone != model.config.backbone:
        raise ValueError(f"teacher_backbone={backbone!r} but the model in {path!r} is a {model.config.backbone!r}; "
                         f"drop teacher_backbone (a RUN/model directory says its own)")
    return TorchTeacher(path, model, "run_model")


def _weights_file_teacher(path: str, backbone: str, image_size: int, channels: int) -> TorchTeacher:
    from trainer.models import EmbeddingModel, ModelConfig

    try:
        from trainer.init_from import load_initial_weights
    except ImportError as error:  # the weights-file reader lives in trainer.init_from
        raise ValueError(f"teacher {path!r}: weights-file teachers need trainer.init_from ({error})") from None
    try:
        model = EmbeddingModel(ModelConfig(backbone=backbone, image_size=int(image_size), channels=channels))
    except (KeyError, ValueError) as error:
        raise ValueError(f"teacher_backbone={backbone!r} cannot be built: {error}") from None
    try:
        load_initial_weights(model, path)
    except Exception as error:  # noqa: BLE001 - missing/unexpected keys, bad shapes, unreadable files: all user input
        raise ValueError(f"teacher {path!r} does not load into a {backbone!r} backbone: {error}") from None
    return TorchTeacher(path, model, "weights")


def _probe(teacher: Teacher) -> None:
    size, channels = teacher.contract.image_size, teacher.contract.channels
    try:
        teacher(torch.zeros(2, channels, size, size))
    except Exception as error:  # noqa: BLE001 - a teacher that cannot embed two images is unusable, whatever the cause
        raise ValueError(f"teacher {teacher.source!r} fails on a test batch of two {size} px images: {error}") from None
