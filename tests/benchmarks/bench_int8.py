"""Eager PyTorch fp32 vs ONNX fp32 vs ONNX int8: images/s side by side, and what int8 costs in quality.

Speed: for resnet18-cifar at 32 px and open_clip ViT-B-32 at 224 px (randomly initialised: speed does not
depend on the weights), the model is exported by ``export.onnx.export_model`` with ``int8=True``
(calibrated on the first ``--calibration-size`` CIFAR-10 train images, checked on the next 256), and the
same preprocessed CIFAR-10 test images are embedded by

* ``eager``: ``EmbeddingModel.encode_image`` under ``torch.inference_mode()`` + L2 normalisation
* ``onnx-fp32``: ``export.runtime.Encoder(precision="fp32")`` (the runtime's session options)
* ``onnx-int8``: ``export.runtime.Encoder(precision="int8")``

at batches 1, 16 and 64, with the same number of threads on every side. Sides are interleaved and their
order rotates between repeats (the machine is shared); medians over repeats, ratios to eager.

Quality: a cnn-small trained briefly with SimCLR (``trainer/pretrain.py``, cached under ``--cache``) is
exported fp32 + int8 (calibrated on train images), all 60,000 CIFAR-10 images are embedded by both, and
weighted kNN top-1 (k=200, tau=0.1, as ``trainer.evaluate``) is measured with the 50,000 train
embeddings as the bank and the 10,000 test images as queries; plus min/mean cosine int8 vs fp32 on the
test images (none of which were calibration images).

    python tests/benchmarks/bench_int8.py --repeats 3 --output tests/benchmarks/RESULTS_onnx.md
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

DEFAULT_DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "cifar10")
DEFAULT_CACHE = "/tmp/manyview-bench-int8"
MODELS = {
    # name: (backbone, image size, images per measurement, calibration images)
    "resnet18-cifar": ("resnet18-cifar", 32, 128, 512),
    "open_clip:ViT-B-32": ("open_clip:ViT-B-32", 224, 32, 256),
}
BATCH_SIZES = (1, 16, 64)
SIDES = ("eager", "onnx-fp32", "onnx-int8")
TARGETS = {"onnx-fp32": 1.5, "onnx-int8": 2.5}  # x eager images/s at batch 64
KNN_STEPS = 300


def _bench_onnx():
    spec = importlib.util.spec_from_file_location("bench_onnx", os.path.join(HERE, "bench_onnx.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpu_name() -> str:
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def export_both(backbone: str, size: int, workdir: str, data: str, calibration_size: int, model=None) -> tuple[str, str, dict]:
    """Save (a random-init model unless ``model`` is given) and export fp32 + int8; (model dir, onnx dir, report)."""
    import torch

    from export.onnx import export_model
    from trainer.models import EmbeddingModel, ModelConfig, save_model

    model_dir, onnx_dir = os.path.join(workdir, "model"), os.path.join(workdir, "onnx")
    if model is None:
        torch.manual_seed(0)
        model = EmbeddingModel(ModelConfig(backbone=backbone, image_size=size)).eval()
        save_model(model, model_dir, {"objective": "benchmark"})
    else:
        model_dir = model
    from export.quantize import CalibrationError

    started = time.perf_counter()
    try:
        report = export_model(model_dir, onnx_dir, int8=True, calibration_data=f"{data}/train-000000.tar.gz",
                              calibration_size=calibration_size)
    except CalibrationError as error:  # still time eager and fp32; the refusal is the int8 result
        print(f"int8 refused: {error}", flush=True)
        report = export_model(model_dir, onnx_dir)
        report["int8_refused"] = str(error)
    report["export_seconds"] = round(time.perf_counter() - started, 1)
    return model_dir, onnx_dir, report


def make_sides(model_dir: str, onnx_dir: str, threads: int) -> dict:
    import torch

    from export.runtime import CPU, Encoder
    from trainer.models import load_model

    torch.set_num_threads(threads)
    model, _ = load_model(model_dir)

    def eager(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return torch.nn.functional.normalize(model.encode_image(torch.from_numpy(batch)), dim=1).numpy()

    def onnx(precision: str):
        encoder = Encoder(onnx_dir, providers=[CPU], precision=precision, threads=threads)
        return lambda batch: encoder.encode_batch(batch, batch_size=len(batch))

    sides = {"eager": eager, "onnx-fp32": onnx("fp32")}
    if "int8" in Encoder(onnx_dir, providers=[CPU]).info.get("variants", {}):
        sides["onnx-int8"] = onnx("int8")
    return sides


def bench_model(name: str, images, data: str, repeats: int, threads: int, helpers, calibration: int | None = None) -> dict:
    from export.runtime import CPU, Encoder
    from trainer.data.preprocess import preprocess_batch

    backbone, size, per_measure, calibration_size = MODELS[name]
    calibration_size = calibration or calibration_size
    workdir = tempfile.mkdtemp(prefix="bench-int8-")
    try:
        model_dir, onnx_dir, report = export_both(backbone, size, workdir, data, calibration_size)
        spec = Encoder(onnx_dir, providers=[CPU]).preprocess
        inputs = preprocess_batch(images[: max(BATCH_SIZES)], spec).astype(np.float32)
        sides = make_sides(model_dir, onnx_dir, threads)
        reference = sides["eager"](inputs[:8])
        fp32_diff = float(np.abs(sides["onnx-fp32"](inputs[:8]) - reference).max())
        int8_cos = float((sides["onnx-int8"](inputs[:8]) * reference).sum(axis=1).min()) if "onnx-int8" in sides else None
        if fp32_diff > 1e-4:
            raise RuntimeError(f"{name}: onnx-fp32 max abs diff {fp32_diff:.3g} to eager > 1e-4")
        rows, order = [], [side for side in SIDES if side in sides]
        for repeat in range(repeats):
            for batch_size in BATCH_SIZES:
                shift = repeat % len(order)
                for side in order[shift:] + order[:shift]:
                    rate = helpers.measure(sides[side], inputs, batch_size, per_measure, lambda: None, repeat == 0)
                    rows.append({"model": name, "repeat": repeat, "batch": batch_size, "side": side,
                                 "images_per_s": rate, "load": os.getloadavg()[0]})
                    print(f"{name} r{repeat} batch {batch_size:>2} {side:<10} {rate:8.1f} img/s "
                          f"(load {os.getloadavg()[0]:.1f})", flush=True)
        summary = []
        for batch_size in BATCH_SIZES:
            medians = {side: statistics.median(r["images_per_s"] for r in rows
                                               if r["batch"] == batch_size and r["side"] == side) for side in order}
            for side, value in medians.items():
                summary.append({"model": name, "batch": batch_size, "side": side, "median_images_per_s": value,
                                "ratio_to_eager": value / medians["eager"]})
        return {"rows": rows, "summary": summary, "report": report, "fp32_max_abs_diff": fp32_diff,
                "int8_min_cosine_bench_images": int8_cos}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def knn_top1(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, labels: np.ndarray,
             classes: int = 10, k: int = 200, temperature: float = 0.1, chunk: int = 1000) -> float:
    """Weighted kNN top-1 (Wu et al. 2018; ``trainer.evaluate.knn_predict`` in numpy)."""
    correct = 0
    for start in range(0, len(queries), chunk):
        sims = queries[start:start + chunk] @ bank.T
        top = np.argpartition(-sims, k, axis=1)[:, :k]
        weights = np.exp(np.take_along_axis(sims, top, axis=1) / temperature)
        votes = np.zeros((len(top), classes))
        for column in range(k):
            np.add.at(votes, (np.arange(len(top)), bank_labels[top[:, column]]), weights[:, column])
        correct += int((votes.argmax(axis=1) == labels[start:start + chunk]).sum())
    return correct / len(queries)


def embed_split(encoder, pattern: str) -> tuple[np.ndarray, np.ndarray]:
    from trainer.data.shards import decode_image, iter_samples

    images, labels, chunks = [], [], []
    for sample in iter_samples(pattern):
        images.append(decode_image(sample.image))
        labels.append(sample.label)
        if len(images) == 2000:
            chunks.append(encoder.encode_images(images, batch_size=256))
            images = []
    if images:
        chunks.append(encoder.encode_images(images, batch_size=256))
    return np.concatenate(chunks), np.asarray(labels)


def knn_quality(data: str, cache: str, steps: int, threads: int) -> dict:
    """Train cnn-small briefly (cached), export fp32 + int8, kNN top-1 of both on all of CIFAR-10."""
    from export.runtime import CPU, Encoder

    run = os.path.join(cache, f"cnn-small-simclr-{steps}")
    if not os.path.exists(os.path.join(run, "model", "config.json")):
        command = [sys.executable, "trainer/pretrain.py", "--objective", "simclr", "--train-data",
                   f"{data}/train-*.tar.gz", "--output", run, "--backbone", "cnn-small",
                   "--batch-size", "128", "--max-steps", str(steps), "--optimizer", "adamw", "--lr", "4e-3",
                   "--weight-decay", "1e-4", "--checkpoint-every", "0", "--log-every", "50"]
        print(" ".join(command), flush=True)
        subprocess.run(command, cwd=REPO, check=True)
    _, onnx_dir, report = export_both("cnn-small", 32, run, data, 512, model=os.path.join(run, "model"))
    if "int8_refused" in report:
        return {"model": f"cnn-small, SimCLR {steps} steps", "refused": report["int8_refused"]}
    result = {"model": f"cnn-small, SimCLR {steps} steps (batch 128)", "report": report}
    embeddings = {}
    for precision in ("fp32", "int8"):
        encoder = Encoder(onnx_dir, providers=[CPU], precision=precision, threads=threads)
        tick = time.perf_counter()
        bank, bank_labels = embed_split(encoder, f"{data}/train-*.tar.gz")
        queries, labels = embed_split(encoder, f"{data}/test-*.tar.gz")
        embeddings[precision] = queries
        result[f"knn_top1_{precision}"] = knn_top1(bank, bank_labels, queries, labels)
        result[f"embed_seconds_{precision}"] = round(time.perf_counter() - tick, 1)
        print(f"kNN top-1 {precision}: {result[f'knn_top1_{precision}']:.4f}", flush=True)
    cosine = (embeddings["fp32"] * embeddings["int8"]).sum(axis=1)
    result.update({"test_min_cosine": float(cosine.min()), "test_mean_cosine": float(cosine.mean()),
                   "knn_drop_points": 100 * (result["knn_top1_fp32"] - result["knn_top1_int8"])})
    return result


def markdown(results: dict, argv: list[str], seconds: float) -> str:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    info = results["machine"]
    lines = [
        f"## {when}: eager fp32 vs ONNX fp32 vs ONNX int8 ({results['repeats']} repeats, {results['threads']} "
        f"thread(s) per side)", "",
        f"- Machine: {info['cpu']} (/proc/cpuinfo), {info['cores']} cores, no GPU; torch {info['torch']}, "
        f"onnxruntime {info['onnxruntime']}",
        f"- Load average (1/5/15 min) at start: {'/'.join(f'{x:.1f}' for x in info['load'])}, at the end: "
        f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())} (shared machine)",
        f"- Command: `python tests/benchmarks/bench_int8.py {' '.join(argv)}` ({seconds / 60:.0f} min in all)",
        "", "| model | batch | side | median images/s | ratio to eager |", "|---|---:|---|---:|---:|",
    ]
    for model in results["models"].values():
        for row in model["summary"]:
            lines.append(f"| {row['model']} | {row['batch']} | {row['side']} | {row['median_images_per_s']:.1f} | "
                         f"{row['ratio_to_eager']:.2f} |")
    lines += ["", "int8 export (calibrated on CIFAR-10 train-000000, checked on the next 256 held-out images):", ""]
    for name, model in results["models"].items():
        if "int8_refused" in model["report"]:
            lines.append(f"- {name}: int8 export refused: {model['report']['int8_refused']}")
            continue
        int8 = model["report"]["image_int8"]
        tried = ", ".join(f"{t['method']} min {t['min_cosine']:.4f}" for t in int8.get("methods_tried", []))
        lines.append(f"- {name}: {int8['method']} on {int8['calibration']['count']} images; held-out min cosine "
                     f"{int8['held_out']['min_cosine']:.4f}, mean {int8['held_out']['mean_cosine']:.5f}"
                     f"{' (tried: ' + tried + ')' if tried else ''}; export {model['report']['export_seconds']:.0f} s; "
                     f"fp32 parity max abs diff {model['fp32_max_abs_diff']:.1e}")
    knn = results.get("knn")
    if knn and "refused" in knn:
        lines += ["", f"Quality on CIFAR-10 ({knn['model']}): int8 export refused: {knn['refused']}"]
    elif knn:
        lines += ["", f"Quality on CIFAR-10 ({knn['model']}; bank 50,000 train, queries 10,000 test, weighted kNN "
                      f"k=200): fp32 {100 * knn['knn_top1_fp32']:.2f}%, int8 {100 * knn['knn_top1_int8']:.2f}% "
                      f"({knn['knn_drop_points']:+.2f} points fp32 - int8); int8 vs fp32 cosine on the 10,000 test "
                      f"images: min {knn['test_min_cosine']:.4f}, mean {knn['test_mean_cosine']:.5f}; embedding 60,000 "
                      f"images: fp32 {knn['embed_seconds_fp32']:.0f} s, int8 {knn['embed_seconds_int8']:.0f} s "
                      "(decoding included)."]
    lines += ["", "<details><summary>Per-repeat measurements (images/s)</summary>", "",
              "| model | repeat | batch | side | images/s | load |", "|---|---:|---:|---|---:|---:|"]
    for model in results["models"].values():
        for row in model["rows"]:
            lines.append(f"| {row['model']} | {row['repeat']} | {row['batch']} | {row['side']} | "
                         f"{row['images_per_s']:.1f} | {row['load']:.1f} |")
    lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


def run(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {list(MODELS)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--data", default=DEFAULT_DATA, help="directory with the CIFAR-10 shards")
    parser.add_argument("--cache", default=DEFAULT_CACHE, help="where the briefly trained kNN model is kept")
    parser.add_argument("--knn-steps", type=int, default=KNN_STEPS, help="SimCLR steps of the kNN model (0: skip kNN)")
    parser.add_argument("--calibration-size", type=int, default=None, help="override the per-model calibration size")
    parser.add_argument("--output", default=None, help="append the Markdown section to this file")
    args = parser.parse_args(argv)
    argv = list(argv if argv is not None else sys.argv[1:])
    import onnxruntime
    import torch

    helpers = _bench_onnx()
    started = time.perf_counter()
    results = {"repeats": args.repeats, "threads": args.threads, "models": {},
               "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
                           "onnxruntime": onnxruntime.__version__, "load": os.getloadavg()}}
    images, _ = helpers.load_images(max(BATCH_SIZES), args.data)
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}; choose from {list(MODELS)}")
        results["models"][name] = bench_model(name, images, args.data, args.repeats, args.threads, helpers,
                                              args.calibration_size)
    if args.knn_steps:
        results["knn"] = knn_quality(args.data, args.cache, args.knn_steps, args.threads)
    results["markdown"] = markdown(results, argv, time.perf_counter() - started)
    print(results["markdown"])
    if args.output:
        with open(args.output, "a", encoding="utf-8") as handle:
            handle.write("\n" + results["markdown"])
    return results


if __name__ == "__main__":
    out = run()
    print(json.dumps({"summary": [row for m in out["models"].values() for row in m["summary"]],
                      "knn": {k: v for k, v in (out.get("knn") or {}).items() if k != "report"}}, indent=1))
