"""Extraction throughput: ``--engine ray`` against the plain single-process path, on the same machine.

    flock /tmp/manyview-bench.lock python tests/benchmarks/bench_ray_extract.py \
        [--data '../shared/data/cifar10/test-*.tar.gz'] [--encoder resnet18-cifar|tiny] [--rounds 3] \
        [--output tests/benchmarks/RESULTS_ray.md]
    pytest tests/benchmarks/bench_ray_extract.py -m benchmark -s     # the same, as an on-demand test

The shards are read where they lie (``../shared/data/cifar10``, never copied). The encoder is exported
here once: ``resnet18-cifar`` (randomly initialised, 32 px: the speed does not depend on the weights) or
``tiny`` (the two-layer test encoder of ``tests/onnx_fixtures.py``, where decoding dominates and any
overhead of the engine shows most). Both sides run the command a user runs, ``python -m export.extract``
with the same settings (batch 64, float16, fp32 encoder, default threads) into a fresh output directory:

* ``local``: ``--engine local`` (decoding in ``cores - 1`` worker processes, encoding in the main one);
* ``ray``: ``--engine ray --address HOST:PORT`` on a one-node cluster this script starts once with
  ``ray start --head --num-cpus <cores>`` (its start-up is reported apart, and it is stopped by pid at the
  end); every run connects, creates its encoder actors and readers afresh: all inside the timed run.

Figures: images / the ``seconds`` of the command's JSON summary (from the call of ``extract`` to the
finalised output: Ray connection and actor start-up included), and the same over the whole process's wall
clock (Python start-up and imports included). Sides alternate within a round and the first side alternates
between rounds; medians over rounds. Every ray run's output is checked against the local run's: same ids in
the same order, vectors equal to float16 storage precision. Ray overhead = 1 - ray / local.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10"
TARGET_OVERHEAD = 0.10

from bench_app_latency import cpu_model  # noqa: E402  (after the sys.path lines above)
from server_helpers import free_port, process_tree  # noqa: E402

try:
    import pytest
except ImportError:  # run as a script without pytest
    pytest = None


def make_encoder(kind: str, workdir: Path) -> Path:
    """Export the benchmark encoder into ``workdir``; returns its directory."""
    if kind == "tiny":
        from onnx_fixtures import make_onnx_dir

        return make_onnx_dir(workdir / "tiny", with_text=False)
    import torch

    from export.onnx import export_model
    from trainer.models import EmbeddingModel, ModelConfig, save_model

    torch.manual_seed(0)
    model = EmbeddingModel(ModelConfig(backbone=kind, image_size=32)).eval()
    save_model(model, str(workdir / "model"), {"objective": "benchmark"})
    export_model(str(workdir / "model"), str(workdir / "onnx"))
    return workdir / "onnx"


def ray_env() -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    return env


def start_cluster(temp: str) -> str:
    """``ray start --head`` on 127.0.0.1 with all cores, its files in ``temp``; returns its address."""
    port = free_port()
    subprocess.run([str(Path(sys.executable).with_name("ray")), "start", "--head", "--port", str(port),
                    "--num-cpus", str(os.cpu_count()), "--node-ip-address", "127.0.0.1", "--include-dashboard=false",
                    "--disable-usage-stats", "--temp-dir", temp], env=ray_env(), check=True, capture_output=True)
    return f"127.0.0.1:{port}"


def stop_cluster(markers: tuple[str, ...]) -> None:
    """Kill the cluster's processes (command line naming a marker, and their descendants) by pid."""
    for pid in process_tree(markers):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_side(side: str, encoder: Path, data: str, output: Path, batch_size: int, address: str) -> dict:
    """One ``python -m export.extract`` run; its summary's seconds and the process's wall clock."""
    shutil.rmtree(output, ignore_errors=True)
    command = [sys.executable, "-m", "export.extract", "--encoder", str(encoder), "--data", data, "--output",
               str(output), "--batch-size", str(batch_size), "--precision", "fp32", "--no-progress",
               "--engine", side]
    if side == "ray":
        command += ["--address", address]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=ray_env(), capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{side} run failed ({done.returncode}): {done.stderr[-2000:]}")
    summary = json.loads(done.stdout)
    assert summary["complete"], summary
    images = summary["written"]
    return {"seconds": summary["seconds"], "wall": wall, "images": images,
            "images_per_second": images / summary["seconds"], "wall_images_per_second": images / wall,
            "actors": summary.get("actors"), "readers": summary.get("readers"),
            "startup": summary.get("startup_seconds")}


def same_output(expected: Path, actual: Path) -> None:
    import numpy as np

    from export.embeddings import read_all

    vectors, table = read_all(actual)
    reference, reference_table = read_all(expected)
    if table.column("id").to_pylist() != reference_table.column("id").to_pylist():
        raise AssertionError("the ray engine wrote other ids or another order than the local engine")
    np.testing.assert_allclose(vectors, reference, atol=2e-3)


def run(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA / "test-*.tar.gz"), help="shard spec (read in place)")
    parser.add_argument("--encoder", choices=["resnet18-cifar", "tiny"], default="resnet18-cifar")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--output", default=None, help="append the Markdown section to this file")
    args = parser.parse_args(argv)
    argv = list(argv if argv is not None else sys.argv[1:])
    workdir = Path(tempfile.mkdtemp(prefix="bench-ray-extract-"))
    temp = tempfile.mkdtemp(prefix="mvbench", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    address = ""
    load_before = os.getloadavg()
    try:
        encoder = make_encoder(args.encoder, workdir)
        tick = time.perf_counter()
        address = start_cluster(temp)
        ray_start = time.perf_counter() - tick
        runs: dict[str, list[dict]] = {"local": [], "ray": []}
        for round_index in range(args.rounds):
            order = ("local", "ray") if round_index % 2 == 0 else ("ray", "local")
            for side in order:
                result = run_side(side, encoder, args.data, workdir / side, args.batch_size, address)
                runs[side].append(result)
                print(f"round {round_index + 1} {side}: {result['images']} images in {result['seconds']:.1f} s "
                      f"({result['wall']:.1f} s wall) = {result['images_per_second']:.0f} images/s", flush=True)
            same_output(workdir / "local", workdir / "ray")
    finally:
        stop_cluster((temp, address) if address else (temp,))
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
    medians = {side: statistics.median(r["images_per_second"] for r in results) for side, results in runs.items()}
    walls = {side: statistics.median(r["wall_images_per_second"] for r in results) for side, results in runs.items()}
    overhead = 1 - medians["ray"] / medians["local"]
    result = {"medians": medians, "wall_medians": walls, "ratio": medians["ray"] / medians["local"],
              "overhead": overhead, "wall_overhead": 1 - walls["ray"] / walls["local"], "ray_start_seconds": ray_start,
              "runs": runs, "load_before": load_before, "load_after": os.getloadavg()}
    result["markdown"] = markdown(result, args, argv)
    print(result["markdown"])
    if args.output:
        with open(args.output, "a", encoding="utf-8") as handle:
            handle.write("\n" + result["markdown"])
    return result


def markdown(result: dict, args: argparse.Namespace, argv: list[str]) -> str:
    import onnxruntime

    runs, medians = result["runs"], result["medians"]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    images = runs["local"][0]["images"]
    lines = [
        f"## {now}: {args.encoder}, {images} images, {args.rounds} round(s)",
        "",
        f"- Machine: {cpu_model()}, {os.cpu_count()} cores, no GPU; shared with other jobs: load average "
        f"{'/'.join(f'{x:.1f}' for x in result['load_before'])} before, "
        f"{'/'.join(f'{x:.1f}' for x in result['load_after'])} after",
        f"- Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}, ray {_ray_version()}; "
        f"data `{args.data}` (read in place)",
        f"- Command: `flock /tmp/manyview-bench.lock python tests/benchmarks/bench_ray_extract.py {' '.join(argv)}`",
        f"- Ray: one-node cluster (`ray start --head --num-cpus {os.cpu_count()}`), started once in "
        f"{result['ray_start_seconds']:.1f} s (not in the figures); per run {runs['ray'][0]['actors']} encoder "
        f"actor(s) and {runs['ray'][0]['readers']} reader(s), connected and created inside the timed run",
        "",
        "| side | images/s per round (summary) | median images/s | ratio to local | median images/s, process wall "
        "clock | ratio |",
        "|---|---|---|---|---|---|",
    ]
    walls = result["wall_medians"]
    for side in ("local", "ray"):
        per_round = ", ".join(f"{r['images_per_second']:.0f}" for r in runs[side])
        lines.append(f"| {side} | {per_round} | {medians[side]:.0f} | {medians[side] / medians['local']:.3f} | "
                     f"{walls[side]:.0f} | {walls[side] / walls['local']:.3f} |")
    startups = [r["startup"] for r in runs["ray"] if r["startup"] is not None]
    if startups:
        steady = statistics.median(r["images"] / (r["seconds"] - r["startup"]) for r in runs["ray"] if r["startup"])
        lines += ["", f"Inside each ray run, {statistics.median(startups):.1f} s (median) passed from the call to the "
                  f"first encoded unit (connecting, starting actors and readers, loading the encoder); after it the "
                  f"ray engine ran at a median {steady:.0f} images/s."]
    verdict = "within" if result["overhead"] <= TARGET_OVERHEAD else "over"
    lines += ["", f"Ray overhead: {100 * result['overhead']:.1f}% ({verdict} the {100 * TARGET_OVERHEAD:.0f}% "
              f"target); {100 * result['wall_overhead']:.1f}% on the process wall clock. Every ray output was "
              "checked equal to the local one (ids, order, vectors).", ""]
    return "\n".join(lines)


def _ray_version() -> str:
    import ray

    return ray.__version__


if pytest is not None:
    @pytest.mark.benchmark
    def test_ray_extract_throughput() -> None:
        if not DEFAULT_DATA.exists():
            pytest.skip(f"CIFAR-10 shards not found at {DEFAULT_DATA}")
        pytest.importorskip("ray")
        result = run(["--rounds", "3"])
        assert result["medians"]["ray"] > 0


if __name__ == "__main__":
    run()
