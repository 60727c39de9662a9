"""Recall@1/10/100 of an index against exact search, and its queries per second.

    python -m index.evaluate --index RUN/index [--queries Q.npy | --queries EMB] [--base EMB]
        [--k 1,10,100] [--num-queries 1000] [--param nprobe=64] [--cpu]

Queries: a ``.npy`` float32 [Q, D] file, an embeddings directory (``export.embeddings``; its first
``--num-queries`` rows), or, by default, a random sample of the indexed vectors themselves, each left
out of its own results. Exact neighbours come from the vectors the index was built from: ``--base``,
else the embeddings named in ``index.json``, else the vectors the index stores (Flat, HNSW, IVF-Flat;
PQ codes are lossy, so compressed indexes need ``--base``). Prints one JSON object. No torch.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from index.construct import gather_rows
from index.search import Index
from index.sources import EmbeddingsSource
from index.store import stored_vectors
from index.tune import drop_self, exact_neighbours, recall_at

logger = logging.getLogger(__name__)

DEFAULT_KS = (1, 10, 100)
TIMING_REPEATS = 3
IN_MEMORY_EXACT_BYTES = 4 << 30


def _base_blocks(index: Index, base: str | os.PathLike | None) -> tuple[Any, str]:
    """A callable giving ``(vectors, ids)`` blocks of the exact vectors, and where they come from."""
    path = base or index.info.get("embeddings")
    if path:
        source = EmbeddingsSource(path)
        if source.dim != index.dim:
            raise ValueError(f"dimension mismatch: --base {path} is {source.dim}-d, the index {index.dim}-d")
        return (lambda: ((v, t.column("id").to_numpy()) for v, t in source.blocks())), str(path)
    if stored_vectors(index.faiss_index) is None:
        raise ValueError(f"{index.info.get('factory')!r} stores compressed vectors; give --base EMB "
                         "(the embeddings it was built from) for exact neighbours")
    return (lambda: stored_vectors(index.faiss_index)), "stored vectors"


def _load_queries(queries: str | os.PathLike, limit: int) -> np.ndarray:
    path = Path(queries)
    if path.is_dir():
        from export.embeddings import read_embeddings

        blocks, total = [], 0
        for vectors, _ in read_embeddings(path):
            blocks.append(vectors)
            total += len(vectors)
            if total >= limit:
                break
        loaded = np.concatenate(blocks) if blocks else np.zeros((0, 0), dtype=np.float32)
    elif path.is_file():
        loaded = np.load(path)
    else:
        raise FileNotFoundError(f"queries {str(path)!r} do not exist (a .npy file or an embeddings directory)")
    loaded = np.asarray(loaded, dtype=np.float32)
    if loaded.ndim != 2 or len(loaded) == 0:
        raise ValueError(f"queries must be a non-empty [Q, D] array, got shape {loaded.shape}")
    return np.ascontiguousarray(loaded[:limit])


def _sample_stored(blocks: Iterator[tuple[np.ndarray, np.ndarray]], count: int, limit: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rows = np.sort(np.random.default_rng(seed).choice(count, size=min(limit, count), replace=False))

    class _Blocks:  # gather_rows wants (vectors, table-like with column("id"))
        dim = 0

        def blocks(self):
            import pyarrow as pa

            for vectors, ids in blocks:
                yield vectors, pa.table({"id": pa.array(ids, type=pa.int64())})

    return gather_rows(_Blocks(), rows)


def evaluate(index_dir: str | os.PathLike, queries: str | os.PathLike | np.ndarray | None = None,
             base: str | os.PathLike | None = None, ks: Sequence[int] = DEFAULT_KS, num_queries: int = 1000,
             params: dict | None = None, use_gpu: bool | None = None, seed: int = 0) -> dict:
    """Recall@k for each k in ``ks`` and queries/s of the index and of exact search (see the module doc)."""
    index = Index.load(index_dir, use_gpu=use_gpu)
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"k must be at least 1, got {ks}")
    blocks, base_name = _base_blocks(index, base)
    if queries is None:
        query_vectors, exclude = _sample_stored(blocks(), index.count, num_queries, seed)
    else:
        query_vectors = queries if isinstance(queries, np.ndarray) else _load_queries(queries, num_queries)
        query_vectors, exclude = np.ascontiguousarray(query_vectors[:num_queries], dtype=np.float32), None
    if query_vectors.shape[1] != index.dim:
        raise ValueError(f"dimension mismatch: queries are {query_vectors.shape[1]}-d but the index holds {index.dim}-d vectors")
    available = index.count - (1 if exclude is not None else 0)
    if ks[-1] > available:
        raise ValueError(f"k={ks[-1]} is larger than the collection ({available} vectors to rank)")
    extra = 0 if exclude is None else 1
    in_memory = index.count * index.dim * 4 <= IN_MEMORY_EXACT_BYTES
    base_blocks = list(blocks()) if in_memory else None  # time the exact search, not the reading
    started = time.perf_counter()
    truth = exact_neighbours(query_vectors, base_blocks if in_memory else blocks(), ks[-1] + extra)
    exact_seconds = time.perf_counter() - started
    truth_ids = drop_self(truth.ids, exclude, ks[-1])
    timings = []
    for _ in range(TIMING_REPEATS):
        started = time.perf_counter()
        _, found = index.search(query_vectors, ks[-1] + extra, params=params)
        timings.append(time.perf_counter() - started)
    found = drop_self(found, exclude, ks[-1])
    seconds = float(np.median(timings))
    result = {
        "index": str(index.directory), "factory": index.info.get("factory"), "count": index.count,
        "params": {**index.search_params, **(params or {})}, "queries": int(len(query_vectors)),
        "queries_from": "stored vectors (self left out)" if exclude is not None else str(queries if not isinstance(queries, np.ndarray) else "array"),
        "exact_from": base_name, "gpu": index.on_gpu,
    }
    result.update({f"recall@{k}": round(recall_at(found, truth_ids, k), 4) for k in ks})
    result["queries_per_s"] = round(len(query_vectors) / max(seconds, 1e-9), 1)
    result["exact_queries_per_s"] = round(len(query_vectors) / max(exact_seconds, 1e-9), 1)
    result["speedup_vs_exact"] = round(result["queries_per_s"] / max(result["exact_queries_per_s"], 1e-9), 2)
    return result


def _parse_param(text: str) -> tuple[str, int]:
    name, _, value = text.partition("=")
    if not value:
        raise argparse.ArgumentTypeError(f"--param wants name=value, got {text!r}")
    return name, int(value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m index.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", required=True, help="index directory (RUN/index)")
    parser.add_argument("--queries", help=".npy [Q, D] or an embeddings directory (default: stored vectors)")
    parser.add_argument("--base", help="embeddings the index was built from (for exact neighbours)")
    parser.add_argument("--k", default=",".join(map(str, DEFAULT_KS)), help="comma-separated k values (1,10,100)")
    parser.add_argument("--num-queries", type=int, default=1000)
    parser.add_argument("--param", type=_parse_param, action="append", default=[], help="search parameter, e.g. nprobe=64")
    parser.add_argument("--cpu", action="store_true", help="search on the CPU even if a GPU is present")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        ks = [int(k) for k in args.k.split(",") if k.strip()]
        result = evaluate(args.index, args.queries, args.base, ks, args.num_queries, dict(args.param) or None,
                          use_gpu=False if args.cpu else None)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
