"""What a set of indexes costs at search time against the one merged index it replaces (``index.merge
--num-indexes``): the same parts merged into 1 and into N members, searched through ``index.search.Index`` with the
same ``nprobe`` (so the same neighbours), one query per call and 1,000 per call, rounds interleaved.

    flock /tmp/manyview-bench.lock python tests/benchmarks/bench_index_set.py [--count 500000] [--members 4]
        [--output tests/benchmarks/RESULTS_index.md]
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
for path in (ROOT, ROOT / "tests", ROOT / "tests" / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def embeddings(directory: Path, count: int, dim: int, parts: int, seed: int = 0) -> tuple[Path, np.ndarray]:
    """``count`` unit vectors around 1,000 centres, written as ``parts`` embeddings parts."""
    from export.embeddings import finalize, metadata_table, open_output, write_part

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, dim)).astype(np.float32)
    vectors = centres[rng.integers(0, 1000, count)] + 0.7 * rng.standard_normal((count, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    open_output(directory, {"fingerprint": "b" * 64, "directory": "synthetic"}, dim, "float32")
    for part, rows in enumerate(np.array_split(np.arange(count), parts)):
        n = len(rows)
        table = metadata_table(rows, [f"k{i}" for i in rows], ["s"] * n, [-1] * n, [""] * n, [""] * n)
        write_part(directory, f"p{part:03d}", vectors[rows], table)
    finalize(directory)
    return directory, vectors


def seconds(index, queries: np.ndarray, k: int, batch: int) -> float:
    started = time.perf_counter()
    for start in range(0, len(queries), batch):
        index.search(queries[start:start + batch], k)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    import faiss

    from bench_app_latency import cpu_model
    from index.merge import add_part, merge, train
    from index.search import Index

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=500_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "manyview-bench-index-set"))
    parser.add_argument("--output", default="")
    args = parser.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    parts = 2 * args.members
    emb, vectors = embeddings(work / "emb", args.count, args.dim, parts)
    train(emb, work / "parts", factory=f"IVF{args.nlist},Flat")
    for part in range(parts):
        add_part(work / "parts", part, parts)
    merge(work / "parts", work / "one", tune_queries=0)
    merge(work / "parts", work / "set", tune_queries=0, num_indexes=args.members)
    one, members = Index.load(work / "one"), Index.load(work / "set")
    for index in (one, members):
        index.search_params = {"nprobe": args.nprobe}
        faiss.ParameterSpace().set_index_parameter(index.faiss_index, "nprobe", args.nprobe)
    rng = np.random.default_rng(1)
    queries = vectors[rng.choice(args.count, 1000, replace=False)] + 0.1 * rng.standard_normal((1000, args.dim)
                                                                                              ).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    same = np.array_equal(one.search(queries, 10)[1], members.search(queries, 10)[1])
    timings: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):  # interleaved: the machine's speed drifts
        for batch, count in ((1, 200), (1000, 1000)):
            for name, index in (("one", one), ("set", members)):
                timings.setdefault((name, batch), []).append(seconds(index, queries[:count], 10, batch) / count)
    lines = ["", f"## A set of {args.members} indexes against the one merged index ({args.count:,} x {args.dim}, "
             f"IVF{args.nlist},Flat, nprobe {args.nprobe})", "",
             f"Run {datetime.date.today().isoformat()} on {cpu_model()} ({os.cpu_count()} cores), faiss "
             f"{faiss.omp_get_max_threads()} thread(s). Command:", "",
             f"    flock /tmp/manyview-bench.lock .venv/bin/python tests/benchmarks/bench_index_set.py --count "
             f"{args.count} --members {args.members} --rounds {args.rounds}", "",
             f"Same 10 neighbours for all 1,000 queries: {'yes' if same else 'NO'}. Medians of {args.rounds} "
             "interleaved rounds, per query:", "",
             "| queries per call | one index | set | set / one |", "|---|---|---|---|"]
    for batch in (1, 1000):
        a, b = float(np.median(timings[("one", batch)])), float(np.median(timings[("set", batch)]))
        lines.append(f"| {batch:,} | {1e3 * a:.3f} ms | {1e3 * b:.3f} ms | {b / a:.2f} |")
    print("\n".join(lines))
    if args.output:
        with open(args.output, "a", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
