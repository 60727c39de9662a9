"""export.contract: the encoder directory's names, formats, the one preprocess.json reader/writer, l2_normalize."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export import contract
from export.contract import (
    FLOAT_NCHW, IMAGE_MODEL_INT8, UINT8_NHWC, EncoderError, Preprocess, describe_execution, empty_batch,
    l2_normalize, make_preprocess_info, prepare_image, read_preprocess, variant_files, write_preprocess,
)

ROOT = Path(__file__).resolve().parents[1]


def test_preprocess_json_round_trip(tmp_path: Path) -> None:
    spec = Preprocess(image_size=24, channels=1, mean=[0.5], std=[0.25])
    tokenizer = {"type": "clip_bpe", "vocab_file": contract.VOCAB_NAME, "context_length": 16}
    info = make_preprocess_info(spec, 32, input_format=UINT8_NHWC, has_text=True, int8=True, tokenizer=tokenizer,
                                model={"objective": "clip"}, opset=17)
    path = write_preprocess(tmp_path, info)
    assert path == tmp_path / contract.PREPROCESS
    back = read_preprocess(tmp_path)
    assert back == json.loads(json.dumps(info))  # exactly what was written, through JSON
    assert Preprocess.from_dict(back) == spec
    assert back["image_input"] == contract.UINT8_INPUT and back["text_input"] == contract.TEXT_INPUT
    assert back["output"] == contract.OUTPUT and back["normalized_output"] is False and back["embed_dim"] == 32
    assert any("uint8" in step for step in back["client_steps"])
    assert variant_files(back, "int8") == {"image": IMAGE_MODEL_INT8, "text": contract.TEXT_MODEL}
    assert variant_files(back, "fp32") == {"image": contract.IMAGE_MODEL, "text": contract.TEXT_MODEL}
    assert "fp16" not in back["variants"]
    assert contract.declares_text(back)

    image_only = make_preprocess_info(spec, 8, tokenizer=tokenizer)  # no text tower: no tokenizer either
    assert image_only["tokenizer"] is None and image_only["text_input"] is None
    assert not contract.declares_text(image_only)
    assert variant_files(image_only, "fp32")["text"] is None
    assert variant_files({}, "fp32") == contract.DEFAULT_FILES  # directories written before variants existed


def test_read_preprocess_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="preprocess.json"):
        read_preprocess(tmp_path)
    (tmp_path / contract.PREPROCESS).write_text("{not json")
    with pytest.raises(EncoderError, match="not valid JSON"):
        read_preprocess(tmp_path)
    (tmp_path / contract.PREPROCESS).write_text("[1, 2]")
    with pytest.raises(EncoderError, match="JSON object"):
        read_preprocess(tmp_path)
    (tmp_path / contract.PREPROCESS).write_text(json.dumps({"input_format": "float16_nchw"}))
    with pytest.raises(EncoderError, match="input_format"):
        read_preprocess(tmp_path)


def test_l2_normalize_keeps_zero_rows_zero() -> None:
    vectors = np.array([[3.0, 4.0], [0.0, 0.0], [1e-20, 0.0]], dtype=np.float32)
    out = l2_normalize(vectors)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    np.testing.assert_allclose(out[0], [0.6, 0.8], atol=1e-6)
    assert (out[1] == 0).all()
    wide = l2_normalize(vectors.astype(np.float16), np.float64)
    assert wide.dtype == np.float64 and np.isfinite(wide).all()
    assert l2_normalize(np.zeros((0, 4))).shape == (0, 4)


def test_prepare_image_formats() -> None:
    spec = Preprocess(image_size=8, channels=3, mean=[0.5] * 3, std=[0.5] * 3)
    image = Image.new("RGB", (16, 12), (255, 0, 0))
    pixels = prepare_image(image, spec, FLOAT_NCHW)
    assert pixels.shape == (3, 8, 8) and pixels.dtype == np.float32 and np.allclose(pixels[0], 1.0)
    raw = prepare_image(image, spec, UINT8_NHWC)
    assert raw.shape == (8, 8, 3) and raw.dtype == np.uint8 and (raw[..., 0] == 255).all()
    assert empty_batch(spec, UINT8_NHWC).shape == (0, 8, 8, 3) and empty_batch(spec).shape == (0, 3, 8, 8)
    with pytest.raises(ValueError, match="input_format"):
        prepare_image(image, spec, "bgr")
    assert describe_execution("int8", "CPUExecutionProvider") == "int8 variant on CPUExecutionProvider"


def test_runtime_reexports_the_contract() -> None:
    """One definition of each: the runtime's names are the contract's objects."""
    from export import embeddings, onnx, quantize, runtime

    assert runtime.EncoderError is contract.EncoderError and runtime.l2_normalize is contract.l2_normalize
    assert runtime.prepare_image is contract.prepare_image and runtime.Preprocess is contract.Preprocess
    assert quantize.INT8_MODEL == contract.IMAGE_MODEL_INT8 and quantize.INT8_REPORT == contract.INT8_REPORT
    assert onnx.IMAGE_MODEL == contract.IMAGE_MODEL and onnx.OUTPUT == contract.OUTPUT
    assert embeddings.read_preprocess is contract.read_preprocess


def test_only_the_contract_names_preprocess_json() -> None:
    """Every read or write of preprocess.json in export/index/app goes through export.contract: no other
    module spells the file name as a string literal, opens it, or defines its own L2 normalisation."""
    offenders = []
    for path in sorted([*(ROOT / "export").glob("*.py"), *(ROOT / "index").glob("*.py"), *(ROOT / "app").glob("*.py")]):
        if path.name == "contract.py":
            continue
        source = path.read_text(encoding="utf-8")
        if re.search(r"""["']preprocess\.json["']""", source):
            offenders.append(f"{path.name}: 'preprocess.json' literal")
        if re.search(r"def\s+_?(l2_)?normali[sz]e", source):
            offenders.append(f"{path.name}: its own normalise function")
    assert not offenders, offenders
