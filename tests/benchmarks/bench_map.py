"""Time to first paint of the Map tab in Chromium, at 60,000 and 1,000,000 points.

    flock /tmp/manyview-bench.lock .venv/bin/python tests/benchmarks/bench_map.py \
        --points 60000 1000000 --output tests/benchmarks/RESULTS_map.md

For each size a synthetic index (``tests/map_fixtures.py``: clustered unit vectors, ``--dim`` wide, an
``IDMap2,Flat`` index with metadata pointing at two generated shards) is written under ``--workdir`` once.
``--index`` adds a real index (e.g. the 60,000-image CIFAR-10 index ``bench_app_latency.py`` builds).
Each index is served by ``python -m app`` and opened in Chromium (software WebGL, as in CI); the time is
from the click on the Map tab to the first WebGL frame holding every point in its colours (the page
stamps ``performance.now()`` after a ``readPixels`` that waits for the GPU). Three cases:

* cold: the first start, no projection cached: PCA + k-means-free label colouring computed, then drawn;
* restart: a new server process, the projection read back from ``RUN/index/map/``;
* reload: the page reloaded on a warm server (``--repeats`` times; median and spread quoted).

The server-side PCA and k-means (k = 10, faiss) times are measured in this process on the same index.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from map_fixtures import make_map_index, make_map_shards  # noqa: E402
from server_helpers import free_port, stop_process  # noqa: E402

sys.path.insert(0, str(ROOT / "tests" / "benchmarks"))
from bench_app_latency import cpu_model  # noqa: E402

CHROMIUM = os.environ.get("MANYVIEW_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def synthetic_index(workdir: Path, points: int, dim: int) -> Path:
    """The synthetic index of ``points`` points (built once, reused)."""
    directory = workdir / f"index-{points}-{dim}"
    if not (directory / "index.json").exists():
        shards = make_map_shards(workdir / "data", per_shard=40)
        make_map_index(directory, shards, points, dim=dim)
    return directory


def onnx_dir(workdir: Path, dim: int) -> Path:
    """A tiny text+image encoder of width ``dim`` (the app needs one; the map never runs it)."""
    from onnx_fixtures import make_onnx_dir

    directory = workdir / f"onnx-{dim}"
    if not (directory / "preprocess.json").exists():
        make_onnx_dir(directory, with_text=True, dim=dim)
    return directory


def serve(encoder: Path, index: Path, log: Path) -> tuple[subprocess.Popen, str]:
    from server_helpers import wait_until_serving

    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), GRADIO_ANALYTICS_ENABLED="False", NO_PROXY="127.0.0.1,localhost")
    handle = open(log, "ab")
    process = subprocess.Popen([sys.executable, "-m", "app", "--encoder", str(encoder), "--index", str(index),
                                "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT, env=env, stdout=handle,
                               stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    wait_until_serving(url, process, log, 600.0)
    return process, url


def first_paint_ms(page: Any, url: str, count: int, timeout_ms: int) -> float:
    """Load ``url``, click the Map tab, wait for every point drawn; milliseconds from the click to that frame."""
    page.goto(url, wait_until="domcontentloaded", timeout=120_000)
    page.get_by_role("tab", name="Map").wait_for(timeout=120_000)
    start = page.evaluate("() => performance.now()")
    page.get_by_role("tab", name="Map").click()
    page.wait_for_function("n => document.querySelector('#mv-map .mvm-wrap')?.dataset.firstPaint && "
                           "document.querySelector('#mv-map .mvm-wrap').dataset.painted === n",
                           arg=str(count), timeout=timeout_ms)
    painted = float(page.evaluate("() => document.querySelector('#mv-map .mvm-wrap').dataset.firstPaint"))
    return painted - start


def server_side(index_dir: Path) -> dict:
    """PCA (from scratch, not cached) and k-means times in this process."""
    from index.search import Index

    from app import projection

    index = Index.load(index_dir)
    rows = projection.map_rows(index.count)
    blocks = projection.vector_blocks(index, rows)
    tick = time.perf_counter()
    projection.pca_layout(blocks, len(rows), index.dim)
    pca = time.perf_counter() - tick
    tick = time.perf_counter()
    projection.kmeans_labels(blocks, len(rows), index.dim, 10)
    return {"pca_s": round(pca, 2), "kmeans10_s": round(time.perf_counter() - tick, 2)}


def measure(name: str, encoder: Path, index_dir: Path, repeats: int, scratch: Path, sync_api: Any) -> dict:
    import shutil

    from index.search import Index

    count = Index.load(index_dir).count
    shutil.rmtree(index_dir / "map", ignore_errors=True)  # cold: nothing cached beside the index
    result: dict = {"name": name, "points": count, "dim": Index.load(index_dir).dim}
    log = scratch / f"server-{count}.log"
    timeout_ms = 600_000
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for case in ("cold", "restart"):
                process, url = serve(encoder, index_dir, log)
                try:
                    page = browser.new_page(viewport={"width": 1280, "height": 1000})
                    result[f"{case}_ms"] = round(first_paint_ms(page, url, count, timeout_ms))
                    if case == "restart":
                        reloads = [first_paint_ms(page, url, count, timeout_ms) for _ in range(repeats)]
                        result["reload_ms"] = [round(value) for value in reloads]
                        result["reload_median_ms"] = round(statistics.median(reloads))
                    page.close()
                finally:
                    stop_process(process)
        finally:
            browser.close()
    result["cache_bytes"] = sum(path.stat().st_size for path in (index_dir / "map").glob("*.npz"))
    result.update(server_side(index_dir))
    return result


def markdown(results: list[dict], command: str, note: str) -> str:
    lines = [
        "# Map tab: time to first paint (Chromium, software WebGL)",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, no GPU "
        f"(Chromium {CHROMIUM}, `--disable-gpu`: SwiftShader WebGL2).",
        f"Command: `{command}`",
        "",
        note,
        "",
        "Time from the click on the Map tab to the first WebGL frame with every point in its colours",
        "(label colouring): cold = first start, PCA computed and cached beside the index; restart = new server",
        "process, projection read back from `RUN/index/map/`; reload = page reloaded on the warm server",
        "(median of the repeats, all repeats listed).",
        "PCA and k-means (k = 10, faiss) are the server-side compute times for the same points, measured separately.",
        "",
        "| index | points | dim | cold | restart | reload (median) | reloads | PCA | k-means k=10 | cache on disk |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['name']} | {r['points']:,} | {r['dim']} | {r['cold_ms'] / 1000:.2f} s | "
                     f"{r['restart_ms'] / 1000:.2f} s | {r['reload_median_ms'] / 1000:.2f} s | "
                     f"{', '.join(f'{v / 1000:.2f}' for v in r['reload_ms'])} | {r['pca_s']:.2f} s | "
                     f"{r['kmeans10_s']:.2f} s | {r['cache_bytes'] / 1e6:.1f} MB |")
    return "\n".join(lines) + "\n"


def run(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, nargs="+", default=[60_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--index", action="append", default=[], help="NAME=ENCODER_DIR:INDEX_DIR, a real index to add")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "manyview-bench-map"))
    parser.add_argument("--output", help="write the Markdown table here")
    parser.add_argument("--note", default="", help="a line for the results file (e.g. other load on the machine)")
    args = parser.parse_args(argv)
    from playwright import sync_api

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    encoder = onnx_dir(workdir, args.dim)
    results = []
    for spec in args.index:
        name, _, dirs = spec.partition("=")
        encoder_dir, _, index_dir = dirs.partition(":")
        results.append(measure(name, Path(encoder_dir), Path(index_dir), args.repeats, workdir, sync_api))
        print(json.dumps(results[-1]), flush=True)
    for points in args.points:
        results.append(measure("synthetic (clustered)", encoder, synthetic_index(workdir, points, args.dim),
                               args.repeats, workdir, sync_api))
        print(json.dumps(results[-1]), flush=True)
    if args.output:
        command = ("flock /tmp/manyview-bench.lock .venv/bin/python tests/benchmarks/bench_map.py "
                   + shlex.join(argv if argv is not None else sys.argv[1:]))
        Path(args.output).write_text(markdown(results, command, args.note), encoding="utf-8")
    return results


if __name__ == "__main__":
    run()
