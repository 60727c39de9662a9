"""ONNX encoder vs eager PyTorch: embedding throughput (images/s) on the same images and batch sizes.

For each model (resnet18-cifar at 32 px and open_clip ViT-B-32 at 224 px, randomly initialised: speed does
not depend on the weights), the model is saved, exported with ``python -m export``'s code (parity-checked),
and the same preprocessed CIFAR-10 test images are embedded by:

* ``eager``: ``EmbeddingModel.encode_image`` under ``torch.inference_mode()`` + L2 normalisation
* ``onnx``: ``export.runtime.Encoder.encode_batch`` (ONNX Runtime, the runtime's session options)
* ``onnx+iob``: the same through IO binding (the default on CUDA)
* on a GPU (when torch and onnxruntime both see one): ``eager-cuda``, ``eager-cuda-fp16`` (autocast),
  ``onnx-cuda`` / ``onnx-cuda-fp16``, each with and without IO binding

at batch sizes 1, 16 and 64, with the same number of threads on both sides (``--threads``, default all
cores). Sides are interleaved and their order rotates between repeats because other work on the machine
makes its speed drift; the summary gives medians over repeats and ratios to eager. Decoding and resizing
are excluded (identical for both sides; ``python -m export.extract`` does them in worker processes).

    python tests/benchmarks/bench_onnx.py --repeats 3 --output tests/benchmarks/RESULTS_onnx.md
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

DEFAULT_DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "cifar10")
MODELS = {
    # name: (backbone, image size, images per measurement)
    "resnet18-cifar": ("resnet18-cifar", 32, 128),
    "open_clip:ViT-B-32": ("open_clip:ViT-B-32", 224, 32),
}
BATCH_SIZES = (1, 16, 64)
TARGET_RATIO = 1.3  # ONNX vs eager on CPU at batch 64


def machine() -> dict:
    """CPU model and core count (``lscpu``), GPU name if any, library versions, load average."""
    cpu, cores = platform.processor() or "unknown", os.cpu_count()
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        cpu, cores = fields.get("Model name", cpu), int(fields.get("CPU(s)", cores))
    except (OSError, subprocess.CalledProcessError, ValueError):
        pass
    import onnxruntime
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": cores, "gpu": gpu, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(), "load": os.getloadavg()}


def load_images(count: int, data: str):
    """``count`` CIFAR-10 test images (PIL), or random ones when the shards are absent."""
    pattern = os.path.join(data, "test-000000.tar.gz")
    if os.path.exists(pattern):
        from trainer.data.shards import decode_image, iter_samples

        images = []
        for sample in iter_samples(pattern):
            images.append(decode_image(sample.image))
            if len(images) == count:
                return images, "CIFAR-10 test images"
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from onnx_fixtures import random_images

    return random_images(count), "random images (CIFAR-10 shards not found)"


def export_for_bench(backbone: str, size: int, workdir: str, fp16: bool) -> tuple[str, str, dict, float]:
    """Save a randomly initialised model and export it; returns (model dir, onnx dir, parity, seconds)."""
    import torch

    from export.onnx import export_model
    from trainer.models import EmbeddingModel, ModelConfig, save_model

    torch.manual_seed(0)
    model = EmbeddingModel(ModelConfig(backbone=backbone, image_size=size)).eval()
    model_dir, onnx_dir = os.path.join(workdir, "model"), os.path.join(workdir, "onnx")
    save_model(model, model_dir, {"objective": "benchmark"})
    started = time.perf_counter()
    report = export_model(model_dir, onnx_dir, fp16=fp16)
    return model_dir, onnx_dir, report, time.perf_counter() - started


def make_sides(model_dir: str, onnx_dir: str, threads: int, gpu: bool) -> dict:
    """name -> function(float32 batch [N, C, H, W]) -> L2-normalised [N, D] (numpy)."""
    import numpy as np
    import torch

    from export.runtime import CPU, CUDA, Encoder
    from trainer.models import load_model

    torch.set_num_threads(threads)
    model, _ = load_model(model_dir)

    def eager(device: str, half: bool):
        net = model if device == "cpu" else copy.deepcopy(model).to(device)

        def run(batch: np.ndarray) -> np.ndarray:
            with torch.inference_mode(), torch.autocast(device, dtype=torch.float16, enabled=half):
                out = net.encode_image(torch.from_numpy(batch).to(device)).float()
                out = torch.nn.functional.normalize(out, dim=1).cpu().numpy()
            return out

        return run

    def onnx(providers, precision: str, io_binding: bool):
        encoder = Encoder(onnx_dir, providers=providers, precision=precision, io_binding=io_binding, threads=threads)
        return lambda batch: encoder.encode_batch(batch, batch_size=len(batch))

    sides = {
        "eager": eager("cpu", False),
        "onnx": onnx([CPU], "fp32", False),
        "onnx+iob": onnx([CPU], "fp32", True),
    }
    if gpu:
        cuda = [(CUDA, {"device_id": 0}), CPU]
        sides.update({
            "eager-cuda": eager("cuda", False),
            "eager-cuda-fp16": eager("cuda", True),
            "onnx-cuda": onnx(cuda, "fp32", False),
            "onnx-cuda+iob": onnx(cuda, "fp32", True),
            "onnx-cuda-fp16": onnx(cuda, "fp16", False),
            "onnx-cuda-fp16+iob": onnx(cuda, "fp16", True),
        })
    return sides


def measure(run, inputs, batch_size: int, images: int, synchronize, warm_up: bool) -> float:
    """images/s of ``run`` over at least ``images`` images (whole batches cycling through ``inputs``),
    after one warm-up batch when ``warm_up`` (the first repeat; later repeats find the side warm)."""
    n_batches = max(1, math.ceil(images / batch_size))
    batches = [inputs[(i * batch_size) % len(inputs):][:batch_size] for i in range(n_batches)]
    batches = [b if len(b) == batch_size else inputs[:batch_size] for b in batches]
    if warm_up:
        run(batches[0])
    synchronize()
    started = time.perf_counter()
    for batch in batches:
        run(batch)
    synchronize()
    return n_batches * batch_size / (time.perf_counter() - started)


def bench_model(name: str, images, workdir: str, repeats: int, threads: int, gpu: bool) -> dict:
    import numpy as np
    import torch

    from export.runtime import Encoder, CPU

    backbone, size, per_measure = MODELS[name]
    model_dir, onnx_dir, parity, export_seconds = export_for_bench(backbone, size, workdir, fp16=gpu)
    spec = Encoder(onnx_dir, providers=[CPU]).preprocess
    from trainer.data.preprocess import preprocess_batch

    inputs = preprocess_batch(images[: max(BATCH_SIZES)], spec).astype(np.float32)
    sides = make_sides(model_dir, onnx_dir, threads, gpu)
    # The same numbers first: a benchmark of a wrong graph would be meaningless.
    reference = sides["eager"](inputs[:8])
    for side, run in sides.items():
        diff = float(np.abs(run(inputs[:8]) - reference).max())
        # CUDA float32 convolutions run in TF32 by default (cuDNN in torch, ONNX Runtime's use_tf32): ~1e-3.
        tolerance = 1e-2 if "fp16" in side else 2e-3 if "cuda" in side else 1e-4
        if diff > tolerance:
            raise RuntimeError(f"{name}/{side}: max abs diff {diff:.3g} to eager > {tolerance}")
    synchronize = torch.cuda.synchronize if gpu else (lambda: None)
    rows = []
    order = list(sides)
    for repeat in range(repeats):
        for batch_size in BATCH_SIZES:
            rotated = order[repeat % len(order):] + order[: repeat % len(order)]
            for side in rotated:
                rate = measure(sides[side], inputs, batch_size, per_measure, synchronize, warm_up=repeat == 0)
                rows.append({"model": name, "repeat": repeat, "batch": batch_size, "side": side,
                             "images_per_s": rate, "load": os.getloadavg()[0]})
                print(f"{name} r{repeat} batch {batch_size:>2} {side:<20} {rate:8.1f} img/s "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)
    summary = []
    for batch_size in BATCH_SIZES:
        medians = {side: statistics.median(r["images_per_s"] for r in rows
                                           if r["batch"] == batch_size and r["side"] == side) for side in sides}
        for side, value in medians.items():
            base = medians["eager-cuda"] if "cuda" in side and "eager-cuda" in medians else medians["eager"]
            summary.append({"model": name, "batch": batch_size, "side": side, "median_images_per_s": value,
                            "ratio_to_eager": value / base})
    return {"rows": rows, "summary": summary, "parity": parity, "export_seconds": export_seconds}


def markdown(results: dict, info_before: dict, info_after: dict, argv: list[str], seconds: float) -> str:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    gpu = info_before["gpu"] or "none (GPU rows not run)"
    lines = [
        f"## {when}: {results['repeats']} repeat(s), {results['threads']} thread(s) per side",
        "",
        f"- Machine: {info_before['cpu']}, {info_before['cores']} cores; GPU: {gpu}; torch {info_before['torch']}, "
        f"onnxruntime {info_before['onnxruntime']}, Python {info_before['python']}",
        f"- Load average (1/5/15 min) before: {'/'.join(f'{x:.1f}' for x in info_before['load'])}, after: "
        f"{'/'.join(f'{x:.1f}' for x in info_after['load'])} (the machine is shared with other jobs)",
        f"- Command: `python tests/benchmarks/bench_onnx.py {' '.join(argv)}` ({seconds / 60:.0f} min in all)",
        f"- Images: {results['images']}; decoding and resizing excluded (the same float32 batches for every side)",
        "",
        "| model | batch | side | median images/s | ratio to eager |",
        "|---|---:|---|---:|---:|",
    ]
    for model in results["models"].values():
        for row in model["summary"]:
            lines.append(f"| {row['model']} | {row['batch']} | {row['side']} | {row['median_images_per_s']:.1f} | "
                         f"{row['ratio_to_eager']:.2f} |")
    lines += ["", "Export and parity (fresh random inputs, batch 5):", ""]
    for name, model in results["models"].items():
        parity = ", ".join(f"{k}: max abs diff {v['max_abs_diff']:.1e}, min cos {v['min_cosine']:.6f}"
                           for k, v in model["parity"].items())
        lines.append(f"- {name}: export {model['export_seconds']:.0f} s; {parity}")
    lines += ["", "Per-repeat measurements (images/s):", "", "| model | repeat | batch | side | images/s | load |",
              "|---|---:|---:|---|---:|---:|"]
    for model in results["models"].values():
        for row in model["rows"]:
            lines.append(f"| {row['model']} | {row['repeat']} | {row['batch']} | {row['side']} | "
                         f"{row['images_per_s']:.1f} | {row['load']:.1f} |")
    return "\n".join(lines) + "\n"


def run(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {list(MODELS)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--data", default=DEFAULT_DATA, help="directory with CIFAR-10 test-000000.tar.gz")
    parser.add_argument("--output", default=None, help="append the Markdown section to this file")
    parser.add_argument("--no-gpu", action="store_true", help="skip the GPU rows even when a GPU is present")
    args = parser.parse_args(argv)
    argv = list(argv if argv is not None else sys.argv[1:])
    import onnxruntime
    import torch

    gpu = (not args.no_gpu and torch.cuda.is_available()
           and "CUDAExecutionProvider" in onnxruntime.get_available_providers())
    started = time.perf_counter()
    info_before = machine()
    images, source = load_images(max(BATCH_SIZES), args.data)
    results = {"repeats": args.repeats, "threads": args.threads, "images": source, "gpu": gpu, "models": {}}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}; choose from {list(MODELS)}")
        workdir = tempfile.mkdtemp(prefix="bench-onnx-")
        try:
            results["models"][name] = bench_model(name, images, workdir, args.repeats, args.threads, gpu)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    results["markdown"] = markdown(results, info_before, machine(), argv, time.perf_counter() - started)
    print(results["markdown"])
    if args.output:
        with open(args.output, "a", encoding="utf-8") as handle:
            handle.write("\n" + results["markdown"])
    results["machine"] = info_before
    return results


if __name__ == "__main__":
    out = run()
    print(json.dumps([row for model in out["models"].values() for row in model["summary"]], indent=1))
