"""ONNX encoder vs eager PyTorch throughput (``bench_onnx.py``) as an on-demand test: ``make benchmark`` only.

Environment: BENCH_ONNX_MODELS (comma-separated, default both: resnet18-cifar,open_clip:ViT-B-32),
BENCH_REPEATS (3), BENCH_THREADS (all cores), BENCH_OUTPUT (append the Markdown section to this file),
BENCH_CHECK_TARGETS (1: fail unless ONNX on the CPU reaches 1.3x eager images/s at batch 64 for every
model; 0: only check that every side ran and agreed with eager).
The committed results: ``BENCH_OUTPUT=tests/benchmarks/RESULTS_onnx.md make benchmark``.

``test_int8_and_fp32_against_eager`` runs ``bench_int8.py`` (eager fp32 vs ONNX fp32 vs ONNX int8, and kNN
top-1 of int8 vs fp32 for a briefly trained cnn-small; BENCH_INT8_KNN_STEPS, default 300, 0 skips it).
With BENCH_CHECK_TARGETS=1 it fails unless, at batch 64, ONNX fp32 >= 1.5x and int8 >= 2.5x eager for
every model, and int8 kNN top-1 is within 1 point of fp32 with min cosine >= 0.99 on the test images.
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _driver(name: str = "bench_onnx"):
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env(name: str, default: str) -> str:
    return os.environ.get(name, "").strip() or default


@pytest.mark.benchmark
def test_onnx_encoder_beats_eager_pytorch() -> None:
    driver = _driver()
    argv = ["--models", _env("BENCH_ONNX_MODELS", ",".join(driver.MODELS)), "--repeats", _env("BENCH_REPEATS", "3"),
            "--threads", _env("BENCH_THREADS", str(os.cpu_count() or 1))]
    if os.environ.get("BENCH_OUTPUT"):
        argv += ["--output", os.environ["BENCH_OUTPUT"]]
    print(f"\n{sys.executable} tests/benchmarks/bench_onnx.py {' '.join(argv)}")
    result = driver.run(argv)  # raises if any side's embeddings disagree with eager

    summary = [row for model in result["models"].values() for row in model["summary"]]
    assert summary and all(math.isfinite(r["median_images_per_s"]) and r["median_images_per_s"] > 0 for r in summary)
    if _env("BENCH_CHECK_TARGETS", "1") == "1":
        misses = [f"{r['model']}: onnx/eager at batch 64 = {r['ratio_to_eager']:.2f} (target >= {driver.TARGET_RATIO})"
                  for r in summary if r["batch"] == 64 and r["side"] == "onnx" and r["ratio_to_eager"] < driver.TARGET_RATIO]
        assert not misses, "targets missed:\n" + "\n".join(misses) + "\n\n" + result["markdown"]


@pytest.mark.benchmark
def test_int8_and_fp32_against_eager() -> None:
    driver = _driver("bench_int8")
    argv = ["--models", _env("BENCH_ONNX_MODELS", ",".join(driver.MODELS)), "--repeats", _env("BENCH_REPEATS", "3"),
            "--threads", _env("BENCH_THREADS", str(os.cpu_count() or 1)),
            "--knn-steps", _env("BENCH_INT8_KNN_STEPS", str(driver.KNN_STEPS))]
    if os.environ.get("BENCH_OUTPUT"):
        argv += ["--output", os.environ["BENCH_OUTPUT"]]
    print(f"\n{sys.executable} tests/benchmarks/bench_int8.py {' '.join(argv)}")
    result = driver.run(argv)  # raises if ONNX fp32 disagrees with eager

    summary = [row for model in result["models"].values() for row in model["summary"]]
    assert summary and all(math.isfinite(r["median_images_per_s"]) and r["median_images_per_s"] > 0 for r in summary)
    if _env("BENCH_CHECK_TARGETS", "1") == "1":
        misses = [f"{r['model']}: {r['side']}/eager at batch 64 = {r['ratio_to_eager']:.2f} (target >= {driver.TARGETS[r['side']]})"
                  for r in summary if r["batch"] == 64 and r["side"] in driver.TARGETS
                  and r["ratio_to_eager"] < driver.TARGETS[r["side"]]]
        misses += [f"{name}: int8 refused" for name, model in result["models"].items() if "int8_refused" in model["report"]]
        knn = result.get("knn") or {}
        if "knn_drop_points" in knn and (knn["knn_drop_points"] > 1.0 or knn["test_min_cosine"] < 0.99):
            misses.append(f"kNN: int8 {knn['knn_drop_points']:.2f} points below fp32, min cosine {knn['test_min_cosine']:.4f}")
        assert not misses, "targets missed:\n" + "\n".join(misses) + "\n\n" + result["markdown"]
