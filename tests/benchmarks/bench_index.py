"""Index benchmark: build time, size, recall@10 and queries/s per index type, beside exact search.

    python tests/benchmarks/bench_index.py --dataset mixture [--count 1000000] [--types Flat,IVF4096,Flat;HNSW32]
    python tests/benchmarks/bench_index.py --dataset cifar [--data ../shared/data/cifar10] --output RESULTS.md

Datasets:
* ``mixture``: ``--count`` x 128 float32 unit vectors, a hard mixture of Gaussians: 2000 overlapping
  centres in a 32-d latent space mapped to 128-d plus isotropic noise (IVF needs tens of probes; its
  hardness, recall@10 of IVF4096,Flat at nprobe=1, is reported). Queries: 1000 fresh draws (not indexed).
* ``cifar``: the 60,000 CIFAR-10 images embedded by a randomly initialised cnn-small exported here
  (``trainer/pretrain.py --max-steps 0`` + ``python -m export``); queries: 1000 of those images, held out
  of the index (59,000 indexed). ``--workdir`` caches the embeddings (``cifar_embeddings.npy``).

Each index is built with ``index.build.build_arrays`` (training on the chosen sample, tuning nprobe /
efSearch to ``--target-recall`` on stored queries), then measured on the held-out queries. Exact
search (``IndexFlatIP``) is timed interleaved with each index, ``--repeats`` times, medians reported,
because the machine is shared. Results: one JSON line per index in ``--jsonl``, a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = str(ROOT.parent / "shared" / "data" / "cifar10")
DEFAULT_TYPES = {
    "mixture": "IVF4096,Flat;HNSW32;OPQ32,IVF4096,PQ32",
    "cifar": "HNSW32;IVF1024,Flat;OPQ32,IVF1024,PQ32;auto",
}


def hard_mixture(count: int, dim: int = 128, latent: int = 32, centres: int = 2000, spread: float = 0.9,
                 noise: float = 0.05, seed: int = 0, draw_seed: int = 1, block: int = 200_000) -> np.ndarray:
    """Unit vectors from overlapping Gaussians in a ``latent``-d space, mapped linearly to ``dim``."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centres, latent)).astype(np.float32)
    scales = (spread * (0.5 + rng.random(centres))).astype(np.float32)
    mapping = rng.standard_normal((latent, dim)).astype(np.float32) / np.sqrt(latent)
    draws = np.random.default_rng(draw_seed)
    out = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, block):
        n = min(block, count - start)
        labels = draws.integers(0, centres, n)
        z = means[labels] + scales[labels, None] * draws.standard_normal((n, latent)).astype(np.float32)
        x = z @ mapping + noise * draws.standard_normal((n, dim)).astype(np.float32)
        out[start:start + n] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def cifar_embeddings(data: str, workdir: Path) -> np.ndarray:
    """Export a random-init cnn-small and embed every CIFAR-10 image (train + test) through ONNX."""
    run = workdir / "run"
    python = sys.executable
    train_spec = f"{data}/train-{{000000..000009}}.tar.gz"
    if (run / "onnx" / "image_encoder.onnx").exists():  # a previous run's export in the same --workdir
        return _embed(run, data)
    subprocess.run([python, "trainer/pretrain.py", "--objective", "simclr", "--train-data", train_spec, "--output", str(run),
                    "--backbone", "cnn-small", "--max-steps", "0", "--batch-size", "32"], cwd=ROOT, check=True)
    subprocess.run([python, "-m", "export", "--model", str(run / "model"), "--output", str(run / "onnx")], cwd=ROOT, check=True)
    return _embed(run, data)


def _embed(run: Path, data: str) -> np.ndarray:
    from index.sources import ShardSource

    source = ShardSource(run / "onnx", f"{data}/train-*.tar.gz::{data}/test-*.tar.gz", batch_size=256, progress=False)
    return np.concatenate([vectors for vectors, _ in source.blocks()])


def recall10(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(a[a >= 0], b)) / 10 for a, b in zip(found[:, :10], truth[:, :10])]))


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return float(np.median(times)), result


def machine() -> dict:
    model = "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    import faiss

    return {"cpu": model, "cores": os.cpu_count(), "faiss": faiss.__version__, "gpus": faiss.get_num_gpus(),
            "python": platform.python_version(), "load_at_start": os.getloadavg()}


def run(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("mixture", "cifar"), default="mixture")
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--types", default=None, help="';'-separated factory strings ('auto': index.select's choice)")
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--single", type=int, default=100, help="also time this many queries one per call (0: skip)")
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--jsonl", default=None, help="append one JSON line per index here")
    parser.add_argument("--output", default=None, help="append the Markdown section to this file")
    args = parser.parse_args(argv)

    import faiss

    from index.build import build_arrays
    from index.select import format_bytes

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-index-"))
    info = machine()
    started = time.perf_counter()
    if args.dataset == "mixture":
        base = hard_mixture(args.count)
        queries = hard_mixture(args.queries, draw_seed=2)
    else:
        cached = workdir / "cifar_embeddings.npy"
        vectors = np.load(cached) if cached.exists() else cifar_embeddings(args.data, workdir)
        np.save(cached, vectors)
        held_out = np.zeros(len(vectors), dtype=bool)
        held_out[np.random.default_rng(0).choice(len(vectors), size=args.queries, replace=False)] = True
        base, queries = vectors[~held_out], vectors[held_out]
    ids = np.arange(len(base), dtype=np.int64)
    print(f"{args.dataset}: {base.shape} in {time.perf_counter() - started:.0f} s", flush=True)
    exact = faiss.IndexFlatIP(base.shape[1])
    exact.add(base)
    exact_seconds, (_, truth) = timed(lambda: exact.search(queries, 10), 1)
    rows, exact_qps_all = [], []
    types = (args.types or DEFAULT_TYPES[args.dataset]).split(";")
    for factory in types:
        tick = time.perf_counter()
        index_info, index = build_arrays(base, None, ids=ids, factory=None if factory == "auto" else factory,
                                         target_recall=args.target_recall, tune_queries=500)
        build_seconds = time.perf_counter() - tick
        size = len(faiss.serialize_index(index))
        row = {"dataset": args.dataset, "count": len(base), "factory": index_info["factory"], "requested": factory,
               "build_s": round(build_seconds, 1), "train_s": index_info["train_seconds"], "bytes": size,
               "params": index_info["search_params"], "tuned_recall@10": index_info["recall"]["recall"]}
        if index_info["family"] in ("ivf", "ivfpq"):
            ivf = faiss.extract_index_ivf(index)
            saved = ivf.nprobe
            ivf.nprobe = 1
            row["recall@10_nprobe1"] = round(recall10(index.search(queries, 10)[1], truth), 4)
            ivf.nprobe = saved
        index_times, exact_times = [], []
        for _ in range(args.repeats):  # interleaved: the machine is shared, so both sides see the same load
            seconds, (_, found) = timed(lambda: index.search(queries, 10), 1)
            index_times.append(seconds)
            exact_times.append(timed(lambda: exact.search(queries, 10), 1)[0])
        row["recall@10"] = round(recall10(found, truth), 4)
        row["qps"] = round(len(queries) / float(np.median(index_times)), 1)
        row["exact_qps"] = round(len(queries) / float(np.median(exact_times)), 1)
        row["speedup"] = round(row["qps"] / row["exact_qps"], 1)
        if args.single:  # one query per call, as the app searches: exact search is then memory-bound
            single = queries[: args.single]
            index_single, exact_single = [], []
            for _ in range(args.repeats):
                index_single.append(timed(lambda: [index.search(q[None], 10) for q in single], 1)[0])
                exact_single.append(timed(lambda: [exact.search(q[None], 10) for q in single], 1)[0])
            row["qps_single"] = round(len(single) / float(np.median(index_single)), 1)
            row["exact_qps_single"] = round(len(single) / float(np.median(exact_single)), 1)
            row["speedup_single"] = round(row["qps_single"] / row["exact_qps_single"], 1)
        row["load"] = round(os.getloadavg()[0], 1)
        exact_qps_all += exact_times
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.jsonl:
            with open(args.jsonl, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({**row, "machine": info}) + "\n")
        del index
    exact_row = {"factory": "Flat (exact, IndexFlatIP)", "bytes": base.nbytes, "recall@10": 1.0,
                 "qps": round(len(queries) / float(np.median(exact_qps_all or [exact_seconds])), 1)}
    markdown = to_markdown(args, info, rows, exact_row, format_bytes)
    print(markdown)
    if args.output:
        with open(args.output, "a", encoding="utf-8") as handle:
            handle.write(markdown + "\n")
    return {"rows": rows, "exact": exact_row, "machine": info, "markdown": markdown}


def to_markdown(args, info, rows, exact_row, format_bytes) -> str:
    title = (f"1,000,000 x 128 hard Gaussian mixture" if args.dataset == "mixture" and args.count == 1_000_000
             else f"{rows[0]['count'] if rows else '?'} x {args.dataset}")
    lines = [f"### {title}", "",
             f"Machine: {info['cpu']}, {info['cores']} cores, faiss {info['faiss']}, GPUs: {info['gpus']}; "
             f"load average at start {info['load_at_start'][0]:.1f} (shared machine). Queries: {args.queries}, "
             f"target recall@10 {args.target_recall}, medians of {args.repeats} interleaved runs.", "",
             "| index | build s | size | search params | recall@10 | recall@10 nprobe=1 | queries/s (batch) | exact (batch) | "
             "speed-up | queries/s (1 per call) | exact (1 per call) | speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| `{row['factory']}`{' (auto)' if row['requested'] == 'auto' else ''} | {row['build_s']} | "
                     f"{format_bytes(row['bytes'])} | {row['params'] or '-'} | {row['recall@10']:.3f} | "
                     f"{row.get('recall@10_nprobe1', '-')} | {row['qps']:.0f} | {row['exact_qps']:.0f} | {row['speedup']}x | "
                     f"{row.get('qps_single', '-')} | {row.get('exact_qps_single', '-')} | {row.get('speedup_single', '-')}x |")
    lines.append(f"| exact `Flat` | 0 | {format_bytes(exact_row['bytes'])} | - | 1.000 | - | {exact_row['qps']:.0f} | - | 1x | | | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run()
