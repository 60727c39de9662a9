"""Augmentation throughput (images/s): torchvision's per-image recipe over PIL images vs ``BatchedAugment`` on a
uint8 batch, on this CPU (and on CUDA when torch sees a GPU), the same images and the same recipe.

Configurations:
* ``32px``: 256 CIFAR-10 train images at 32 px, the CIFAR recipe (``AugmentConfig()``: crop scale 0.2-1,
  jitter s = 0.5, no blur), batch 256.
* ``224px``: 64 CIFAR-10 images upscaled to 256 x 256 (the decoded, fixed-size image a worker would hand over),
  SimCLR's ImageNet recipe (crop scale 0.08-1, jitter s = 1.0, blur 0.5), cropped to 224, batch 64.

Sides (one view per image; decoding excluded: the same for both):
* ``per-image``: ``trainer.data.views.augmentation`` on each PIL image (what a data worker does), then the
  collate's ``torch.stack``.
* ``batched``: ``DecodedImage`` on each PIL image (the worker's whole job on the batched path: PIL -> uint8
  tensor), ``torch.stack``, then ``BatchedAugment`` on the batch.
* ``batched-op``: ``BatchedAugment`` alone on the stacked uint8 batch (the part that moves to the device).
* ``batched-cuda`` (when a GPU is present): ``BatchedAugment`` on the batch already on the GPU, synchronised.

Sides are interleaved and their order rotates between repeats (other work on the machine makes its speed
drift); each measurement runs enough batches to take about ``--seconds``; medians over repeats; ratio = side
/ per-image. ``--threads``: torch threads for every side (default 1: a data worker is one thread).

    python tests/benchmarks/bench_augment.py --repeats 5 --output tests/benchmarks/RESULTS_augment.md
"""
from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import statistics
import sys
import tarfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

DEFAULT_DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "cifar10")
CONFIGS = {
    # name: (source side, output size, batch, AugmentConfig fields)
    "32px": (32, 32, 256, {}),
    "224px": (256, 224, 64, {"crop_scale": (0.08, 1.0), "jitter_strength": 1.0, "blur_prob": 0.5}),
}
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_images(data: str, count: int, side: int):
    from PIL import Image

    images = []
    with tarfile.open(os.path.join(data, "train-000000.tar.gz")) as archive:
        for member in archive:
            if member.name.endswith(".jpg"):
                image = Image.open(io.BytesIO(archive.extractfile(member).read())).convert("RGB")
                images.append(image if image.size == (side, side) else image.resize((side, side), Image.BILINEAR))
                if len(images) == count:
                    break
    return images


def sides(name: str, images, generator_seed: int = 0) -> dict:
    """name -> a function that augments one batch of ``images`` (returns the number of images)."""
    import torch

    from trainer.data.batched_augment import BatchedAugment, DecodedImage
    from trainer.data.views import AugmentConfig, augmentation

    side, size, batch, fields = CONFIGS[name]
    config = AugmentConfig(**fields)
    per_image = augmentation(size, MEAN, STD, config)
    augment = BatchedAugment(size, MEAN, STD, config)
    decode = DecodedImage(side)
    generator = torch.Generator().manual_seed(generator_seed)
    uint8 = torch.stack([decode(image)["image_uint8"] for image in images])

    def run_per_image():
        torch.stack([per_image(image) for image in images])
        return len(images)

    def run_batched():
        augment(torch.stack([decode(image)["image_uint8"] for image in images]), generator)
        return len(images)

    def run_op():
        augment(uint8, generator)
        return len(images)

    result = {"per-image": run_per_image, "batched": run_batched, "batched-op": run_op}
    if torch.cuda.is_available():
        on_gpu = uint8.cuda()
        cuda_generator = torch.Generator(device="cuda").manual_seed(generator_seed)

        def run_cuda():
            augment(on_gpu, cuda_generator)
            torch.cuda.synchronize()
            return len(images)

        result["batched-cuda"] = run_cuda
    return result


def measure(fn, seconds: float) -> float:
    """images/s over as many calls as fit in about ``seconds`` (at least 2)."""
    done, calls, started = 0, 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - started < seconds:
        done += fn()
        calls += 1
    return done / (time.perf_counter() - started)


def run(argv: list[str] | None = None) -> dict:
    import torch
    import torchvision

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one measurement")
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--output", help="append the Markdown section to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")

    load_before = os.getloadavg()
    started = time.perf_counter()
    rows = []
    for name in names:
        side, size, batch, fields = CONFIGS[name]
        functions = sides(name, load_images(args.data, batch, side))
        for fn in functions.values():  # warm-up
            fn()
        samples: dict[str, list[float]] = {key: [] for key in functions}
        keys = list(functions)
        for repeat in range(args.repeats):
            rotated = keys[repeat % len(keys):] + keys[:repeat % len(keys)]
            for key in rotated:
                samples[key].append(measure(functions[key], args.seconds))
        base = statistics.median(samples["per-image"])
        for key, values in samples.items():
            median = statistics.median(values)
            rows.append({"config": name, "batch": batch, "size": size, "side": key, "median_images_per_s": median,
                         "ratio_to_per_image": median / base, "all": values})
    load_after = os.getloadavg()

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (batched-cuda not run)"
    command = f"python tests/benchmarks/bench_augment.py {' '.join(argv or sys.argv[1:])}".strip()
    lines = [
        f"## {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC: {args.repeats} repeat(s), "
        f"{args.threads} torch thread(s), ~{args.seconds:g} s per measurement",
        "",
        f"- Machine: {cpu_name()}, {os.cpu_count()} cores; GPU: {gpu}; torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, Python {platform.python_version()}",
        f"- Load average (1/5/15 min) before: {'/'.join(f'{v:.1f}' for v in load_before)}, "
        f"after: {'/'.join(f'{v:.1f}' for v in load_after)} (the machine is shared with other jobs)",
        f"- Command: `{command}` ({(time.perf_counter() - started) / 60:.1f} min in all)",
        "",
        "| config | batch | side | median images/s | ratio to per-image | all repeats |",
        "|---|---:|---|---:|---:|---|",
    ]
    for row in rows:
        lines.append(f"| {row['config']} | {row['batch']} | {row['side']} | {row['median_images_per_s']:.0f} | "
                     f"{row['ratio_to_per_image']:.2f} | {', '.join(f'{v:.0f}' for v in row['all'])} |")
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    if args.output:
        with open(args.output, "a", encoding="utf-8") as handle:
            handle.write("\n" + markdown)
    return {"rows": rows, "markdown": markdown}


@pytest.mark.benchmark
def test_batched_augmentation_throughput():
    """On demand: ``pytest tests/benchmarks/bench_augment.py -m benchmark -s`` (BENCH_OUTPUT: append the table)."""
    if not os.path.isdir(DEFAULT_DATA):
        pytest.skip(f"CIFAR-10 shards not found at {DEFAULT_DATA}")
    argv = ["--repeats", os.environ.get("BENCH_REPEATS", "5"), "--threads", os.environ.get("BENCH_THREADS", "1")]
    if os.environ.get("BENCH_OUTPUT"):
        argv += ["--output", os.environ["BENCH_OUTPUT"]]
    rows = run(argv)["rows"]
    assert rows and all(row["median_images_per_s"] > 0 for row in rows)
    assert {row["side"] for row in rows} >= {"per-image", "batched", "batched-op"}


if __name__ == "__main__":
    run()
