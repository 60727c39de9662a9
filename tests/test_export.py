"""ONNX export of every backbone family: parity, dynamic batch, uint8 input, fp16, preprocess.json, errors.

Small configurations only (16-32 px, a 2-layer open_clip ViT registered here); open_clip ViT-B-32 at 224
is exported by the benchmark (tests/benchmarks/bench_onnx.py), not here.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from export.onnx import FP16_MIN_COSINE, OPSET, ParityError, export_model
from export.runtime import CPU, Encoder, EncoderError
from onnx_fixtures import random_images
from trainer.models import EmbeddingModel, ModelConfig, TextConfig, save_model

ROOT = Path(__file__).resolve().parents[1]
TINY_CLIP = "manyview-test-tiny-vit"
TEXT = TextConfig(context_length=12, width=32, heads=2, layers=1)


@pytest.fixture(scope="module", autouse=True)
def tiny_open_clip(tmp_path_factory):
    """A 2-layer, 64-wide open_clip ViT config (patch 8), so the open_clip family exports in seconds."""
    import open_clip

    path = tmp_path_factory.mktemp("open_clip") / f"{TINY_CLIP}.json"
    path.write_text(json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }))
    open_clip.add_model_config(path)


def _save(tmp_path: Path, config: ModelConfig, name: str = "model") -> Path:
    torch.manual_seed(0)
    model = EmbeddingModel(config).eval()
    with torch.no_grad():  # random BN statistics, so that BN folding is really exercised
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    save_model(model, str(tmp_path / name), {"objective": "test"})
    return tmp_path / name


def _eager_embeddings(model_dir: Path, images) -> np.ndarray:
    """Reference: the saved model in eager PyTorch on the images preprocessed as evaluation does."""
    from trainer.data.preprocess import Preprocess, preprocess_batch
    from trainer.models import load_model

    model, _ = load_model(str(model_dir))
    spec = Preprocess(image_size=model.config.image_size, channels=model.config.channels,
                      mean=list(model.config.mean), std=list(model.config.std))
    with torch.no_grad():
        out = model.encode_image(torch.from_numpy(preprocess_batch(images, spec))).numpy()
    return out / np.linalg.norm(out, axis=1, keepdims=True)


FAMILIES = {
    "resnet18-cifar": ModelConfig(backbone="resnet18-cifar", image_size=16),
    "torchvision-resnet18": ModelConfig(backbone="resnet18", image_size=32),
    "timm-cnn": ModelConfig(backbone="timm:resnet10t", image_size=32),
    "timm-vit": ModelConfig(backbone="vit-tiny-cifar", image_size=32),
    "open_clip-vit+text": ModelConfig(backbone=f"open_clip:{TINY_CLIP}", image_size=32, image_projection=24, text=TEXT),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_exports_with_parity(tmp_path: Path, family: str) -> None:
    config = FAMILIES[family]
    model_dir = _save(tmp_path, ModelConfig(**{**config.__dict__}))
    report = export_model(str(model_dir), str(tmp_path / "onnx"))
    assert report["image"]["max_abs_diff"] <= 1e-4 and report["image"]["batch"] == 5
    assert ("text" in report) == (config.text is not None)
    # The runtime on real images (any size, preprocessed by the runtime) agrees with eager PyTorch.
    images = random_images(3, size=40, seed=1)
    encoder = Encoder(tmp_path / "onnx", providers=[CPU])
    np.testing.assert_allclose(encoder.encode_images(images), _eager_embeddings(model_dir, images), atol=1e-4)


def test_graph_contract_opset_dynamic_batch_and_checker(tmp_path: Path) -> None:
    import onnx

    model_dir = _save(tmp_path, ModelConfig(backbone="cnn-small", image_size=16))
    export_model(str(model_dir), str(tmp_path / "onnx"))
    graph = onnx.load(str(tmp_path / "onnx" / "image_encoder.onnx"))
    onnx.checker.check_model(graph)
    assert [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")] == [OPSET]
    batch_dim = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # symbolic batch axis
    encoder = Encoder(tmp_path / "onnx", providers=[CPU])
    images = random_images(7, size=16)
    np.testing.assert_allclose(encoder.encode_images(images, batch_size=1),
                               encoder.encode_images(images, batch_size=7), atol=1e-5)


def test_uint8_input_and_fp16_variants(tmp_path: Path) -> None:
    config = FAMILIES["open_clip-vit+text"]
    model_dir = _save(tmp_path, ModelConfig(**{**config.__dict__}))
    float_report = export_model(str(model_dir), str(tmp_path / "float"), fp16=True)
    uint8_report = export_model(str(model_dir), str(tmp_path / "uint8"), uint8_input=True, fp16=True)
    for report in (float_report, uint8_report):
        assert report["image"]["max_abs_diff"] <= 1e-4 and report["text"]["max_abs_diff"] <= 1e-4
        assert report["image_fp16"]["min_cosine"] >= FP16_MIN_COSINE
        assert report["text_fp16"]["min_cosine"] >= FP16_MIN_COSINE

    info = json.loads((tmp_path / "uint8" / "preprocess.json").read_text())
    assert info["input_format"] == "uint8_nhwc" and info["image_input"] == "images"
    assert info["variants"]["fp16"] == {"image": "image_encoder.fp16.onnx", "text": "text_encoder.fp16.onnx"}
    assert info["tokenizer"]["context_length"] == 12 and info["tokenizer"]["type"] == "clip_bpe"
    assert any("uint8" in step for step in info["client_steps"])
    assert not any("mean" in step for step in info["client_steps"])  # the graph normalises
    assert (tmp_path / "uint8" / info["tokenizer"]["vocab_file"]).is_file()

    images = random_images(6, size=48, seed=2)
    reference = _eager_embeddings(model_dir, images)
    float32 = Encoder(tmp_path / "float", providers=[CPU])
    uint8 = Encoder(tmp_path / "uint8", providers=[CPU])
    assert float32.precision == "fp32" and uint8.input_format == "uint8_nhwc"
    assert uint8.prepare(images).dtype == np.uint8 and uint8.prepare(images).shape == (6, 32, 32, 3)
    np.testing.assert_allclose(uint8.encode_images(images), reference, atol=1e-4)
    # fp16 on ONNX Runtime's CPU provider (nodes without a float16 CPU kernel run in float32 behind casts).
    for directory in ("float", "uint8"):
        half = Encoder(tmp_path / directory, providers=[CPU], precision="fp16")
        assert half.precision == "fp16"
        cosine = (half.encode_images(images) * reference).sum(axis=1)
        assert cosine.min() >= FP16_MIN_COSINE
        text_cosine = (half.encode_texts(["a cat", "two dogs"]) * float32.encode_texts(["a cat", "two dogs"])).sum(1)
        assert text_cosine.min() >= FP16_MIN_COSINE


def test_io_binding_path_matches_plain_run(tmp_path: Path) -> None:
    """The IO-binding path (default on CUDA) runs here on the CPU device and must give the same numbers."""
    model_dir = _save(tmp_path, ModelConfig(backbone="cnn-small", image_size=16, text=TEXT))
    export_model(str(model_dir), str(tmp_path / "onnx"), uint8_input=True)
    plain = Encoder(tmp_path / "onnx", providers=[CPU], io_binding=False)
    bound = Encoder(tmp_path / "onnx", providers=[CPU], io_binding=True, threads=1)
    assert bound.io_binding and not plain.io_binding
    images = random_images(5, size=16)
    np.testing.assert_allclose(bound.encode_images(images, batch_size=2), plain.encode_images(images), atol=1e-6)
    np.testing.assert_allclose(bound.encode_texts(["a", "b c"]), plain.encode_texts(["a", "b c"]), atol=1e-6)


def test_provider_choice_falls_back_to_cpu_and_logs_it(tmp_path: Path, caplog) -> None:
    import logging

    model_dir = _save(tmp_path, ModelConfig(backbone="cnn-small", image_size=16))
    export_model(str(model_dir), str(tmp_path / "onnx"), fp16=True)
    with caplog.at_level(logging.INFO, logger="export.runtime"):
        encoder = Encoder(tmp_path / "onnx", providers=["CUDAExecutionProvider", CPU])
    assert encoder.providers[-1] == CPU
    assert any(record.message == f"image encoder: fp16 variant on {encoder.providers[0]}" for record in caplog.records)
    # "auto" picks the fp16 variant whenever a GPU provider was asked for, fp32 on a CPU-only list.
    assert encoder.precision == "fp16"
    assert Encoder(tmp_path / "onnx", providers=[CPU]).precision == "fp32"
    with pytest.raises(ValueError, match="precision"):
        Encoder(tmp_path / "onnx", providers=[CPU], precision="int4")


def test_fp16_requested_without_variant(tmp_path: Path) -> None:
    model_dir = _save(tmp_path, ModelConfig(backbone="cnn-small", image_size=16))
    export_model(str(model_dir), str(tmp_path / "onnx"))
    with pytest.raises(EncoderError, match="--fp16"):
        Encoder(tmp_path / "onnx", providers=[CPU], precision="fp16")


def test_encoder_preprocess_mismatch_is_named(tmp_path: Path) -> None:
    model_dir = _save(tmp_path, ModelConfig(backbone="cnn-small", image_size=16))
    export_model(str(model_dir), str(tmp_path / "onnx"))
    path = tmp_path / "onnx" / "preprocess.json"
    original = json.loads(path.read_text())
    path.write_text(json.dumps({**original, "input_format": "uint8_nhwc", "image_input": "pixels"}))
    with pytest.raises(EncoderError, match=r"encoder/preprocess mismatch.*tensor\(float\).*uint8_nhwc"):
        Encoder(tmp_path / "onnx", providers=[CPU])
    path.write_text(json.dumps({**original, "image_size": 24}))
    with pytest.raises(EncoderError, match=r"encoder/preprocess mismatch.*image_size=24"):
        Encoder(tmp_path / "onnx", providers=[CPU])


def test_parity_failure_leaves_output_untouched(tmp_path: Path) -> None:
    model_dir = _save(tmp_path, ModelConfig(backbone="cnn-small", image_size=16))
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "keep.txt").write_text("previous export")
    with pytest.raises(ParityError, match="max abs diff"):
        export_model(str(model_dir), str(tmp_path / "onnx"), tolerance=0.0)
    with pytest.raises(ParityError, match="min cosine"):
        export_model(str(model_dir), str(tmp_path / "onnx"), fp16=True, fp16_min_cosine=1.0 + 1e-9)
    assert [p.name for p in (tmp_path / "onnx").iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".onnx-")]  # staging cleaned up


def test_cli_missing_weights_is_a_clear_error(tmp_path: Path) -> None:
    model_dir = _save(tmp_path, ModelConfig(backbone="cnn-small", image_size=16))
    (model_dir / "model.safetensors").unlink()
    result = subprocess.run([sys.executable, "-m", "export", "--model", str(model_dir), "--output", str(tmp_path / "o")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "no model.safetensors" in result.stderr and "Traceback" not in result.stderr


def test_cli_uint8_fp16(tmp_path: Path) -> None:
    model_dir = _save(tmp_path, ModelConfig(backbone="cnn-small", image_size=16))
    result = subprocess.run([sys.executable, "-m", "export", "--model", str(model_dir), "--output", str(tmp_path / "o"),
                             "--uint8-input", "--fp16"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "image_fp16 encoder parity" in result.stdout
    assert json.loads(result.stdout.strip().splitlines()[-1])["parity"]["image"]["max_abs_diff"] <= 1e-4
    assert {p.name for p in (tmp_path / "o").iterdir()} == {"image_encoder.onnx", "image_encoder.fp16.onnx", "preprocess.json"}
