"""export.runtime.Encoder: ONNX image/text encoders -> L2-normalised embeddings."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export.runtime import CPU, Encoder, EncoderError, default_providers, l2_normalize
from export.tokenizer import ClipTokenizer
from onnx_fixtures import VOCAB_NAME, add_int8_variant, make_onnx_dir, random_images, shared_onnx_dir
from trainer.data.preprocess import preprocess_batch


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    return shared_onnx_dir(tmp_path_factory, with_text=True)


@pytest.fixture(scope="module")
def image_only_dir(tmp_path_factory) -> Path:
    return shared_onnx_dir(tmp_path_factory, with_text=False)


@pytest.fixture(scope="module")
def encoder(text_dir: Path) -> Encoder:
    return Encoder(text_dir)


def test_properties(encoder: Encoder, text_dir: Path) -> None:
    assert encoder.dim == 16
    assert encoder.has_text
    assert encoder.preprocess.image_size == 32
    assert encoder.info["model"]["objective"] == "fixture"
    assert encoder.providers[-1] == CPU
    assert default_providers()[-1] == CPU
    assert str(text_dir.resolve()) in repr(encoder)


def test_encode_images_normalised_and_batch_invariant(encoder: Encoder) -> None:
    images = random_images(10)
    one = encoder.encode_images(images, batch_size=1)
    many = encoder.encode_images(images, batch_size=64)
    assert one.shape == (10, 16) and one.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(one, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(one, many, atol=1e-5)


def test_encode_images_matches_direct_onnxruntime(encoder: Encoder, text_dir: Path) -> None:
    import onnxruntime as ort

    images = random_images(4, seed=3)
    session = ort.InferenceSession(str(text_dir / "image_encoder.onnx"), providers=[CPU])
    raw = session.run(["embedding"], {"pixels": preprocess_batch(images, encoder.preprocess)})[0]
    np.testing.assert_allclose(encoder.encode_images(images), l2_normalize(raw), atol=1e-5)


def test_images_of_other_sizes_and_modes_are_resized(encoder: Encoder) -> None:
    images = [Image.new("RGB", (64, 48), (200, 10, 10)), Image.new("L", (20, 20), 128), random_images(1)[0].convert("RGBA")]
    vectors = encoder.encode_images(images)
    assert vectors.shape == (3, 16)
    assert np.isfinite(vectors).all()


def test_empty_inputs(encoder: Encoder) -> None:
    assert encoder.encode_images([]).shape == (0, 16)
    assert encoder.encode_texts([]).shape == (0, 16)


def test_encode_texts(encoder: Encoder, text_dir: Path) -> None:
    texts = ["a photo of a cat", "a photo of a dog", "a photo of a cat"]
    vectors = encoder.encode_texts(texts)
    assert vectors.shape == (3, 16) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors[0], vectors[2], atol=1e-6)
    assert not np.allclose(vectors[0], vectors[1])
    assert encoder.encode_texts("a photo of a cat").shape == (1, 16)
    expected = ClipTokenizer(text_dir / VOCAB_NAME, context_length=16)(texts)
    np.testing.assert_array_equal(encoder.tokenize(texts), expected)


def test_image_only_model_rejects_text(image_only_dir: Path) -> None:
    encoder = Encoder(image_only_dir)
    assert not encoder.has_text
    with pytest.raises(EncoderError, match="no text encoder"):
        encoder.encode_texts(["a cat"])


def test_missing_directory_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-run" / "onnx"
    with pytest.raises(FileNotFoundError, match="no-such-run"):
        Encoder(missing)


@pytest.mark.parametrize("name", ["preprocess.json", "image_encoder.onnx"])
def test_missing_file_is_named(text_dir: Path, tmp_path: Path, name: str) -> None:
    copy = Path(shutil.copytree(text_dir, tmp_path / "onnx"))
    (copy / name).unlink()
    with pytest.raises(FileNotFoundError, match=name.replace(".", r"\.")):
        Encoder(copy)


def test_missing_vocab_is_named(text_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(text_dir, tmp_path / "onnx"))
    (copy / VOCAB_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="bpe_simple_vocab"):
        Encoder(copy)


def test_corrupt_model_is_named(text_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(text_dir, tmp_path / "onnx"))
    (copy / "image_encoder.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(EncoderError, match="image_encoder.onnx"):
        Encoder(copy)


def test_embed_dim_mismatch(tmp_path: Path) -> None:
    directory = make_onnx_dir(tmp_path / "onnx", with_text=False, dim=16, embed_dim=8)
    with pytest.raises(EncoderError, match=r"embed_dim=8.*16"):
        Encoder(directory)


def test_wrong_input_name(text_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(text_dir, tmp_path / "onnx"))
    info = json.loads((copy / "preprocess.json").read_text())
    info["image_input"] = "images"
    (copy / "preprocess.json").write_text(json.dumps(info))
    with pytest.raises(EncoderError, match="'images'"):
        Encoder(copy)


def test_embed_dim_mismatch_caught_at_run_time(tmp_path: Path, monkeypatch) -> None:
    import export.runtime as runtime

    directory = make_onnx_dir(tmp_path / "onnx", with_text=False, dim=16, embed_dim=8)
    # As for a model whose declared output width is symbolic: loading cannot tell, running must.
    monkeypatch.setattr(runtime, "_static_dim", lambda shape: None)
    encoder = Encoder(directory)
    with pytest.raises(EncoderError, match=r"\(1, 16\).*embed_dim=8"):
        encoder.encode_images(random_images(1))


def test_uint8_and_float_preparation_agree() -> None:
    """The uint8 path (client resizes; the graph normalises) and the float path see the same pixels."""
    from export.runtime import FLOAT_NCHW, UINT8_NHWC, prepare_image
    from trainer.data.preprocess import Preprocess

    spec = Preprocess(image_size=24, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3])
    for image in random_images(2, size=40) + [Image.new("L", (30, 50), 90)]:
        as_uint8 = prepare_image(image, spec, UINT8_NHWC)
        assert as_uint8.dtype == np.uint8 and as_uint8.shape == (24, 24, 3)
        normalised = (as_uint8.astype(np.float32) / 255 - np.array(spec.mean, np.float32)) / np.array(spec.std, np.float32)
        np.testing.assert_allclose(normalised.transpose(2, 0, 1), prepare_image(image, spec, FLOAT_NCHW), atol=1e-6)
    with pytest.raises(ValueError, match="input_format"):
        prepare_image(image, spec, "float16_nchw")


def test_session_options_for_throughput() -> None:
    import onnxruntime as ort

    from export.runtime import session_options

    options = session_options(threads=3)
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL and options.intra_op_num_threads == 3
    # float16 graphs stop before the CPU layout transforms (onnxruntime 1.31 crashes on fp16 ViTs there).
    assert session_options(fp16=True).graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED


# -- variants: auto picks int8 on a CPU when exported; un-normalised outputs --------------------------


@pytest.fixture(scope="module")
def int8_dir(text_dir: Path, tmp_path_factory) -> Path:
    """The text fixture plus an int8 image encoder, as ``python -m export --int8`` leaves it."""
    copy = Path(shutil.copytree(text_dir, tmp_path_factory.mktemp("int8") / "onnx"))
    return add_int8_variant(copy)


def test_auto_picks_int8_on_cpu_when_exported(int8_dir: Path, caplog) -> None:
    with caplog.at_level("INFO", logger="export.runtime"):
        encoder = Encoder(int8_dir)  # default providers: CPU on this machine
    assert encoder.precision == "int8" and encoder.provider == CPU
    assert encoder.execution == {"variant": "int8", "provider": CPU, "image_model": "image_encoder.int8.onnx",
                                 "text_model": "text_encoder.onnx", "requested": "auto"}
    assert encoder.describe() == f"int8 variant on {CPU}"
    assert any(f"image encoder: int8 variant on {CPU}" in record.getMessage() for record in caplog.records)
    assert "int8" in repr(encoder) and encoder.has_text  # the text tower stays float32
    explicit_cpu = Encoder(int8_dir, providers=[CPU])
    assert explicit_cpu.precision == "int8"
    images = random_images(6, seed=11)
    cosine = (Encoder(int8_dir, precision="fp32").encode_images(images) * encoder.encode_images(images)).sum(axis=1)
    assert cosine.min() > 0.9  # a real quantised graph of the same network (random calibration: loose bound)


def test_auto_picks_fp32_without_int8(text_dir: Path) -> None:
    encoder = Encoder(text_dir, providers=[CPU])
    assert encoder.precision == "fp32" and encoder.execution["image_model"] == "image_encoder.onnx"
    assert encoder.describe() == f"fp32 variant on {CPU}"
    with pytest.raises(EncoderError, match="--int8"):
        Encoder(text_dir, precision="int8")


def test_fp32_refuses_int8(int8_dir: Path) -> None:
    encoder = Encoder(int8_dir, precision="fp32")
    assert encoder.precision == "fp32" and encoder.execution["image_model"] == "image_encoder.onnx"
    assert encoder.execution["requested"] == "fp32"
    assert Encoder(int8_dir, precision="int8").precision == "int8"


def test_auto_on_a_gpu_never_picks_int8(int8_dir: Path) -> None:
    """Asked for CUDA (absent here, so onnxruntime falls back), auto still does not pick the CPU-only int8."""
    encoder = Encoder(int8_dir, providers=[("CUDAExecutionProvider", {"device_id": 0}), CPU])
    assert encoder.precision == "fp32"


def test_auto_falls_back_when_the_int8_file_is_missing(int8_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(int8_dir, tmp_path / "onnx"))
    (copy / "image_encoder.int8.onnx").unlink()
    assert Encoder(copy).precision == "fp32"
    with pytest.raises(FileNotFoundError, match="image_encoder.int8.onnx"):
        Encoder(copy, precision="int8")


def test_unnormalised_outputs_are_public(encoder: Encoder, text_dir: Path) -> None:
    import onnxruntime as ort

    images = random_images(5, seed=4)
    session = ort.InferenceSession(str(text_dir / "image_encoder.onnx"), providers=[CPU])
    raw = session.run(["embedding"], {"pixels": preprocess_batch(images, encoder.preprocess)})[0]
    got = encoder.encode_images(images, batch_size=2, normalize=False)
    np.testing.assert_allclose(got, raw, atol=1e-5)
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0)  # really un-normalised
    np.testing.assert_allclose(encoder.encode_batch(encoder.prepare(images), normalize=False), raw, atol=1e-5)
    np.testing.assert_allclose(l2_normalize(got), encoder.encode_images(images), atol=1e-5)
    texts = ["a red square", "noise"]
    raw_text = encoder.encode_texts(texts, normalize=False)
    np.testing.assert_allclose(l2_normalize(raw_text), encoder.encode_texts(texts), atol=1e-5)
    assert not hasattr(encoder, "encode_pixels")  # removed: encode_batch is the one prepared-input entry point
