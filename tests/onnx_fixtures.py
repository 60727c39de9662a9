"""Test helpers: tiny ONNX encoder directories and small WebDataset shards, made without training.

``make_onnx_dir`` writes the same directory layout as ``python -m export`` (see the ONNX directory
contract in ``export/runtime.py``) from a small randomly initialised torch network, so serving
tests (runtime, index, app) can run in seconds. Only this module imports torch, and only inside
``make_onnx_dir``; importing it is cheap.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import warnings
from pathlib import Path

import numpy as np

CIFAR_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"
CIFAR_SKIP_REASON = f"CIFAR-10 shards not found at {CIFAR_DIR} (../shared/data/cifar10 relative to the repo root)"
VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"
CLASSES = ["red", "green", "blue", "noise"]

_memo: dict[tuple, Path] = {}


def open_clip_vocab() -> Path:
    """Path of the BPE vocabulary bundled with the installed open_clip package (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open_clip is not installed; it provides the CLIP BPE vocabulary")
    return Path(list(spec.submodule_search_locations)[0]) / VOCAB_NAME


def _image_net(dim: int, channels: int):
    import torch

    class TinyImageEncoder(torch.nn.Module):
        """Strided conv + pooling + linear: cheap, yet spreads distinct images apart in embedding space."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(channels, 8, kernel_size=3, stride=2, padding=1)
            self.pool = torch.nn.AdaptiveAvgPool2d(4)
            self.proj = torch.nn.Linear(8 * 16, dim)

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            features = self.pool(torch.tanh(self.conv(pixels)))
            return self.proj(features.flatten(1))

    return TinyImageEncoder()


def _text_net(dim: int, vocab_size: int):
    import torch

    class TinyTextEncoder(torch.nn.Module):
        """Token embedding, mean-pooled over non-padding positions."""

        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(vocab_size, dim)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            mask = (tokens != 0).unsqueeze(-1).to(torch.float32)
            summed = (self.embed(tokens) * mask).sum(dim=1)
            return summed / mask.sum(dim=1).clamp(min=1.0)

    return TinyTextEncoder()


def _export(module, example, path: Path, input_name: str) -> None:
    """Export with a dynamic batch axis and the contract's input/output names."""
    import torch

    module.eval()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated but is fast and needs no onnxscript; fine for fixtures.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=[input_name],
            output_names=["embedding"],
            dynamic_axes={input_name: {0: "batch"}, "embedding": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )


def make_onnx_dir(
    path: str | os.PathLike,
    with_text: bool = True,
    dim: int = 16,
    image_size: int = 32,
    channels: int = 3,
    context_length: int = 16,
    embed_dim: int | None = None,
    seed: int = 0,
) -> Path:
    """Write a tiny exported-encoder directory at ``path`` and return it.

    ``embed_dim`` overrides the dimension written to ``preprocess.json`` (to test mismatch errors);
    by default it equals the network's real output ``dim``.
    """
    import torch

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    pixels = torch.zeros(2, channels, image_size, image_size)
    _export(_image_net(dim, channels), pixels, out / "image_encoder.onnx", "pixels")
    tokenizer = None
    if with_text:
        shutil.copyfile(open_clip_vocab(), out / VOCAB_NAME)
        tokens = torch.zeros(2, context_length, dtype=torch.int64)
        _export(_text_net(dim, 49408), tokens, out / "text_encoder.onnx", "tokens")
        tokenizer = {"type": "clip_bpe", "vocab_file": VOCAB_NAME, "context_length": context_length}
    info = {
        "image_size": image_size,
        "channels": channels,
        "mean": [0.5] * channels,
        "std": [0.25] * channels,
        "resize": "bicubic",
        "crop": "center",
        "embed_dim": dim if embed_dim is None else embed_dim,
        "image_input": "pixels",
        "text_input": "tokens",
        "output": "embedding",
        "tokenizer": tokenizer,
        "model": {"objective": "fixture", "backbone": "tiny-conv", "steps": 0},
    }
    (out / "preprocess.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return out


def add_int8_variant(directory: str | os.PathLike, calibration: int = 32, seed: int = 0) -> Path:
    """Quantise ``directory/image_encoder.onnx`` to ``image_encoder.int8.onnx`` (static QDQ, minmax,
    calibrated on random images) and record the ``int8`` variant and its agreement in ``preprocess.json``,
    as ``python -m export --int8`` does (calibrated on random images instead of shards, with no quality
    bound). Returns the directory. Mutates it: copy shared fixtures first. Needs ``onnx`` (the train extra)."""
    from export.contract import (
        IMAGE_MODEL, IMAGE_MODEL_INT8, Preprocess, l2_normalize, prepare_image, read_preprocess, write_preprocess,
    )
    from export.quantize import quantize_graph

    import onnxruntime as ort

    out = Path(directory)
    info = read_preprocess(out)
    spec = Preprocess.from_dict(info)
    inputs = np.stack([prepare_image(image, spec) for image in random_images(calibration + 8, spec.image_size, seed)])
    quantize_graph(str(out / IMAGE_MODEL), str(out / IMAGE_MODEL_INT8), "pixels", inputs[:calibration], "minmax")
    held_out = inputs[calibration:]
    outputs = [l2_normalize(ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
                            .run(["embedding"], {"pixels": held_out})[0], np.float64)
               for name in (IMAGE_MODEL, IMAGE_MODEL_INT8)]
    cosine = (outputs[0] * outputs[1]).sum(axis=1)
    text = "text_encoder.onnx" if info.get("tokenizer") else None
    info["variants"] = {"fp32": {"image": IMAGE_MODEL, "text": text}, "int8": {"image": IMAGE_MODEL_INT8, "text": text}}
    info["parity"] = {"image_int8": {"method": "minmax", "held_out": {
        "count": len(held_out), "min_cosine": float(cosine.min()), "mean_cosine": float(cosine.mean())}}}
    write_preprocess(out, info)
    return out


def shared_onnx_dir(tmp_path_factory, with_text: bool = True, dim: int = 16, image_size: int = 32) -> Path:
    """``make_onnx_dir`` memoised per test session (export costs a second or two on 2 cores)."""
    key = (with_text, dim, image_size)
    if key not in _memo or not _memo[key].exists():
        base = tmp_path_factory.mktemp(f"onnx-{'text' if with_text else 'image'}-{dim}-{image_size}")
        _memo[key] = make_onnx_dir(base, with_text=with_text, dim=dim, image_size=image_size)
    return _memo[key]


def random_images(count: int, size: int = 32, seed: int = 0):
    """``count`` distinct random RGB PIL images (noise over a per-image colour)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        base = rng.integers(0, 256, size=3)
        noise = rng.integers(-60, 60, size=(size, size, 3))
        images.append(Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB"))
    return images


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_shard(
    path: str | os.PathLike,
    count: int = 40,
    start: int = 0,
    corrupt_keys: tuple[int, ...] = (),
    seed: int = 0,
    image_size: int = 32,
    with_manifest: bool = True,
) -> Path:
    """Write a WebDataset shard of ``count`` generated PNG samples (``png``, ``cls``, ``txt``, ``json``).

    Sample ``i`` has key ``sample_{start+i:06d}``, label ``i % len(CLASSES)`` and an explicit ``id`` of
    ``start + i``. Indices in ``corrupt_keys`` get a garbage ``.jpg`` instead of an image. A
    ``manifest.json`` with ``CLASSES`` is written beside the shard unless ``with_manifest`` is False.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    images = random_images(count, size=image_size, seed=seed)
    mode = "w:gz" if out.name.endswith(".gz") else "w"
    with tarfile.open(out, mode) as tar:
        for i, image in enumerate(images):
            key = f"sample_{start + i:06d}"
            label = i % len(CLASSES)
            if i in corrupt_keys:
                _add_member(tar, f"{key}.jpg", b"this is not a jpeg" * 10)
            else:
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                _add_member(tar, f"{key}.png", buffer.getvalue())
            _add_member(tar, f"{key}.cls", str(label).encode())
            _add_member(tar, f"{key}.txt", f"a photo of {CLASSES[label]} number {start + i}".encode())
            _add_member(tar, f"{key}.json", json.dumps({"id": start + i, "label": CLASSES[label]}).encode())
    if with_manifest:
        (out.parent / "manifest.json").write_text(json.dumps({"classes": CLASSES}), encoding="utf-8")
    return out


def cifar_subset_shard(path: str | os.PathLike, count: int = 300) -> Path:
    """Copy the first ``count`` samples of CIFAR-10 ``test-000000.tar.gz`` into a new shard at ``path``.

    Also copies ``manifest.json``. Callers skip (``CIFAR_SKIP_REASON``) when ``CIFAR_DIR`` is absent.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    keys: set[str] = set()
    with tarfile.open(CIFAR_DIR / "test-000000.tar.gz", "r:gz") as source, tarfile.open(out, "w") as target:
        for info in source:
            key = os.path.basename(info.name).partition(".")[0]
            if key not in keys:
                if len(keys) == count:
                    break
                keys.add(key)
            handle = source.extractfile(info)
            if handle is not None:
                target.addfile(info, handle)
    shutil.copyfile(CIFAR_DIR / "manifest.json", out.parent / "manifest.json")
    return out
