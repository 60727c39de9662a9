"""Static int8 quantisation of an exported image encoder, calibrated on images read from shards.

    report = quantize_encoder(staging, info, "SHARDS/train-*.tar.gz", calibration_size=512, min_cosine=0.99)

Writes ``image_encoder.int8.onnx`` beside ``image_encoder.onnx``: QDQ format (QuantizeLinear /
DequantizeLinear pairs that ONNX Runtime fuses into integer kernels), int8 weights quantised per output
channel, int8 activations with ranges calibrated on ``calibration_size`` images decoded from the shards
and prepared exactly as the encoder's clients prepare them (``export.contract.prepare_image``).
Activations are uint8 and weights int8 (U8S8), the combination ONNX Runtime's x86 integer kernels run
natively (AVX2 / AVX512-VNNI): measured on an AVX512-VNNI EPYC, a resnet18-cifar QDQ graph with int8
activations (S8S8) ran *slower* than float32 (168 vs 170 images/s), with uint8 activations 3.5x faster.

Weights use 7 bits of the int8 range ([-64, 64], onnxruntime's ``reduce_range``) on every machine. x86
CPUs without VNNI (AVX2, AVX512BW without VNNI: e.g. AMD Zen 2/3, Intel Skylake) multiply U8S8 with
VPMADDUBSW, which adds each pair of uint8 x int8 products into a *saturating* int16: 255 * 127 * 2 = 64770
clips at 32767, while 255 * 64 * 2 = 32640 fits. With full 8-bit weights a random-init vit-tiny-cifar
(LayerNorm outputs put uint8 activations around their zero point ~128, so large products are common)
reached held-out min cosine 0.877 on an AVX2-only AMD EPYC (Zen 3), against 0.9991 on the AVX512-VNNI EPYC
and 0.9991 with the QDQ pairs left unfused (exact arithmetic); with 7-bit weights it reaches 0.998 there,
and the integer sums are exact on every x86 host, VNNI or not. The int8 file is served on other machines
than the one that exported it, so the agreement measured here has to hold whatever their instruction
set. The cost is one bit of weight precision (per-channel scales keep it small); the kernels are the same.

What is quantised depends on the graph. Convolutional graphs (no LayerNormalization / Softmax / GELU):
every operator ONNX Runtime has an integer kernel for (Conv, Gemm, MatMul, Add, pooling, ...), so residual
additions run in int8 too instead of dequantising around each one (751 vs 594 images/s for
resnet18-cifar). Transformer graphs: only Conv, MatMul and Gemm (they carry the compute); LayerNorm,
Softmax, GELU and residual adds stay in float32, and so do MatMuls between two activations (attention
scores and attention-weighted values), whose ranges vary per image and which carry little of the compute.

Calibration methods (``--calibration-method``): ``minmax`` (observed range), ``entropy`` (KL-divergence
optimal clipping) and ``percentile`` (99.999th percentile of |x|). ``auto`` tries them in that order and
keeps the first whose int8 embeddings agree with float32 on *held-out* images (the images after the
calibration sample in the same shards) to ``min_cosine``; when none does, it raises
``CalibrationError`` naming each method's figure, and the caller leaves the output untouched.

The agreement (min and mean cosine of L2-normalised embeddings), the method, the shard pattern, and the
calibration and held-out sets (counts, first and last keys, a SHA-256 of their keys) are returned for
``preprocess.json`` and ``int8_report.json``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from export.contract import (  # noqa: F401 - INT8_REPORT re-exported for the exporter and tests
    IMAGE_MODEL, IMAGE_MODEL_INT8, INT8_REPORT, Preprocess, l2_normalize, prepare_image,
)

log = logging.getLogger("manyview.export.quantize")

INT8_MODEL = IMAGE_MODEL_INT8
METHODS = ("minmax", "entropy", "percentile")
DEFAULT_MIN_COSINE = 0.99
DEFAULT_CALIBRATION_SIZE = 512
DEFAULT_HELD_OUT_SIZE = 256
CALIBRATION_BATCH = 16  # images per calibration run; the histogram methods merge batch by batch
COMPUTE_OPS = ["Conv", "MatMul", "Gemm"]
# Weights quantised to [-64, 64] instead of [-127, 127]: |uint8 x int8| pair sums stay below 32767, so
# integer kernels that accumulate pairs in saturating int16 (x86 without VNNI) compute exactly.
REDUCE_RANGE = True
WEIGHT_RANGE = (-64, 64)
TRANSFORMER_OPS = {"LayerNormalization", "Softmax", "Erf", "Gelu"}


class CalibrationError(RuntimeError):
    """No calibration method gives int8 embeddings that agree with float32 to the requested bound."""


@dataclass
class ImageSet:
    """Prepared encoder inputs and the shard keys they came from."""

    inputs: np.ndarray
    keys: list[str]

    def describe(self) -> dict:
        digest = hashlib.sha256("\n".join(self.keys).encode("utf-8")).hexdigest()
        return {"count": len(self.keys), "first_key": self.keys[0] if self.keys else None,
                "last_key": self.keys[-1] if self.keys else None, "keys_sha256": digest}


def read_images(pattern: str, calibration_size: int, held_out_size: int, spec, input_format: str) -> tuple[ImageSet, ImageSet]:
    """The first ``calibration_size`` decodable images of the shards named by ``pattern`` (in shard
    order) and the next ``held_out_size``, prepared as the encoder's input (``input_format``)."""
    from trainer.data.shards import decode_image, iter_samples

    mode = "L" if spec.channels == 1 else "RGB"
    wanted = calibration_size + held_out_size
    inputs, keys = [], []
    for sample in iter_samples(pattern):
        if sample.image is None:
            continue
        try:
            image = decode_image(sample.image, mode)
        except ValueError:
            continue  # undecodable samples are skipped, as extraction does
        inputs.append(prepare_image(image, spec, input_format))
        keys.append(f"{os.path.basename(sample.url)}/{sample.key}")
        if len(inputs) == wanted:
            break
    if len(inputs) < calibration_size + min(held_out_size, 1):
        raise CalibrationError(f"{pattern!r} holds {len(inputs)} decodable images; calibration needs "
                               f"{calibration_size} plus held-out images to measure the result on")
    batch = np.stack(inputs)
    return (ImageSet(batch[:calibration_size], keys[:calibration_size]),
            ImageSet(batch[calibration_size:], keys[calibration_size:]))


def _reader(input_name: str, inputs: np.ndarray, batch: int):
    """A CalibrationDataReader over ``inputs`` whose ``set_range`` lets the calibrator collect one batch
    at a time (``CalibStridedMinMax``): statistics are merged per batch instead of holding every
    intermediate tensor of the whole sample in memory."""
    from onnxruntime.quantization import CalibrationDataReader

    class ArrayReader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = [inputs[start:start + batch] for start in range(0, len(inputs), batch)]
            self.set_range(0, len(self.batches))

        def __len__(self) -> int:
            return len(self.batches)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.pending = iter(self.batches[start_index:end_index])

        def get_next(self):
            chunk = next(self.pending, None)
            return None if chunk is None else {input_name: chunk}

    return ArrayReader()


def activation_matmuls(model) -> list[str]:
    """Names of MatMul nodes whose operands are both activations (no initializer): attention scores
    and attention-weighted values in a transformer."""
    constants = {init.name for init in model.graph.initializer}
    constants |= {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    return [node.name for node in model.graph.node
            if node.op_type == "MatMul" and not any(name in constants for name in node.input)]


def quantize_graph(prepared: str, target: str, input_name: str, calibration: np.ndarray, method: str,
                   batch: int = CALIBRATION_BATCH) -> dict:
    """Quantise the pre-processed float graph ``prepared`` into ``target`` with ``method``; returns what
    was quantised."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    model = onnx.load(prepared)
    transformer = any(node.op_type in TRANSFORMER_OPS for node in model.graph.node)
    excluded = activation_matmuls(model) if transformer else []
    quantize_static(
        prepared, target, _reader(input_name, calibration, batch), quant_format=QuantFormat.QDQ,
        op_types_to_quantize=COMPUTE_OPS if transformer else None,  # None: every op with an integer kernel
        # 7-bit weights: no int16 saturation in the VPMADDUBSW kernels of x86 CPUs without VNNI (module docstring)
        per_channel=True, reduce_range=REDUCE_RANGE,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        nodes_to_exclude=excluded, calibrate_method=methods[method],
        extra_options={"CalibStridedMinMax": 1, "ActivationSymmetric": False, "WeightSymmetric": True},
    )
    counts: dict[str, int] = {}
    for node in onnx.load(target).graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0].endswith("_quantized"):
            counts["quantised_initializers"] = counts.get("quantised_initializers", 0) + 1
        elif node.op_type == "QuantizeLinear":
            counts["quantised_activations"] = counts.get("quantised_activations", 0) + 1
    return {"graph": "transformer" if transformer else "convolutional",
            "op_types": COMPUTE_OPS if transformer else "all with integer kernels", **counts,
            "float_activation_matmuls": len(excluded)}


def embed(path: str, input_name: str, inputs: np.ndarray, batch: int = 32, threads: int | None = None) -> np.ndarray:
    """L2-normalised float64 embeddings of ``inputs`` by the graph at ``path`` (the runtime's session options)."""
    import onnxruntime as ort

    from export.runtime import session_options

    session = ort.InferenceSession(path, sess_options=session_options(threads), providers=["CPUExecutionProvider"])
    output = session.get_outputs()[0].name
    chunks = [session.run([output], {input_name: inputs[start:start + batch]})[0]
              for start in range(0, len(inputs), batch)]
    return l2_normalize(np.concatenate(chunks), np.float64)


def agreement(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Min and mean cosine of two sets of L2-normalised rows."""
    cosine = (reference * candidate).sum(axis=1)
    return {"min_cosine": float(cosine.min()), "mean_cosine": float(cosine.mean()), "images": int(len(cosine))}


def quantize_encoder(
    directory: str, info: dict, calibration_data: str, calibration_size: int = DEFAULT_CALIBRATION_SIZE,
    min_cosine: float = DEFAULT_MIN_COSINE, method: str = "auto", held_out_size: int = DEFAULT_HELD_OUT_SIZE,
    source_model: str = IMAGE_MODEL,
) -> dict:
    """Write ``directory/image_encoder.int8.onnx`` from ``directory/source_model`` (the float32 graph as
    exported, before any fused-operator rewrite) and return the report. Raises ``CalibrationError``
    when no method reaches ``min_cosine`` (nothing is written then)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method != "auto" and method not in METHODS:
        raise ValueError(f"calibration method must be 'auto' or one of {METHODS}, got {method!r}")
    if calibration_size < 1:
        raise ValueError(f"--calibration-size must be positive, got {calibration_size}")
    if not 0.0 < min_cosine <= 1.0:
        raise ValueError(f"--min-cosine must be in (0, 1], got {min_cosine}")
    started = time.perf_counter()
    spec = Preprocess.from_dict(info)
    input_name = info["image_input"]
    calibration, held_out = read_images(calibration_data, calibration_size, held_out_size, spec, info["input_format"])
    source = os.path.join(directory, source_model)
    target = os.path.join(directory, INT8_MODEL)
    reference = embed(source, input_name, held_out.inputs)
    tried: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="int8-") as scratch:
        prepared = os.path.join(scratch, "prepared.onnx")
        # Symbolic shape inference and constant folding (BatchNorm into Conv) before calibration, as
        # onnxruntime recommends: the folded weights are the ones quantised.
        try:
            quant_pre_process(source, prepared)
        except Exception as error:  # noqa: BLE001 - onnxruntime's symbolic shape inference asserts on some graphs
            # open_clip's attention reshapes defeat symbolic shape inference (an AssertionError in
            # _infer_Reshape); ONNX's own shape inference and the graph optimisation still apply.
            log.info("symbolic shape inference failed (%s: %s); pre-processing without it", type(error).__name__, error)
            quant_pre_process(source, prepared, skip_symbolic_shape=True)
        for name in (METHODS if method == "auto" else (method,)):
            candidate = os.path.join(scratch, f"{name}.onnx")
            tick = time.perf_counter()
            quantised = quantize_graph(prepared, candidate, input_name, calibration.inputs, name)
            figures = agreement(reference, embed(candidate, input_name, held_out.inputs))
            tried.append({"method": name, **figures, "seconds": round(time.perf_counter() - tick, 1)})
            log.info("int8 %s calibration: held-out min cosine %.5f, mean %.5f", name,
                     figures["min_cosine"], figures["mean_cosine"])
            if figures["min_cosine"] >= min_cosine:
                os.replace(candidate, target)
                break
        else:
            summary = "; ".join(f"{t['method']}: min {t['min_cosine']:.5f}, mean {t['mean_cosine']:.5f}" for t in tried)
            raise CalibrationError(
                f"int8 calibration cannot meet --min-cosine {min_cosine} on {len(held_out.keys)} held-out images "
                f"({summary}); nothing was written. Lower --min-cosine, calibrate on more or more typical images "
                f"(--calibration-size, --calibration-data), or use the float32 encoder."
            )
    chosen = tried[-1]
    return {
        "file": INT8_MODEL,
        "format": "QDQ; int8 weights in [-64, 64] (7 bits: no int16 saturation on x86 without VNNI) per output "
                  "channel (symmetric), uint8 activations per tensor (asymmetric)",
        "quantised": quantised,
        "method": chosen["method"],
        "methods_tried": tried,
        "min_cosine_bound": min_cosine,
        "held_out": {**held_out.describe(), "min_cosine": chosen["min_cosine"], "mean_cosine": chosen["mean_cosine"]},
        "calibration": {"data": calibration_data, **calibration.describe()},
        "seconds": round(time.perf_counter() - started, 1),
    }
