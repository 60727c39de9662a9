"""Exact ground truth, recall@k, and raising ``nprobe`` / ``efSearch`` until a target recall is met.

    truth = exact_neighbours(queries, blocks, k)              # streamed over (vectors, ids) blocks
    result = tune(index, "ivf", queries, truth.ids, k=10, target=0.95, exclude=query_ids)
    result["params"]   # {"nprobe": 24}; also recall, queries_per_s, latency_ms, curve

Recall@k is |approximate top-k  intersect  exact top-k| / k, averaged over queries. When the queries
are stored vectors themselves (``exclude``: their ids), each query's own id is dropped from both lists
before truncating to k, so a query never gets credit for finding itself: that is the held-out
("leave-self-out") measurement used at build time. No torch.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from index.devices import set_search_params

logger = logging.getLogger(__name__)

MAX_EF_SEARCH = 4096
BISECT_STEPS = 3


@dataclass
class Neighbours:
    """Exact top-k: inner-product scores and ids, both [Q, k] (ids -1 where fewer than k exist)."""

    scores: np.ndarray
    ids: np.ndarray


def exact_neighbours(queries: np.ndarray, blocks: Iterable[tuple[np.ndarray, np.ndarray]], k: int) -> Neighbours:
    """Exact inner-product top-``k`` of ``queries`` over all ``(vectors, ids)`` blocks, in bounded memory."""
    import faiss

    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_ids = np.full((len(queries), k), -1, dtype=np.int64)
    for vectors, ids in blocks:
        flat = faiss.IndexFlatIP(queries.shape[1])
        flat.add(np.ascontiguousarray(vectors, dtype=np.float32))
        scores, rows = flat.search(queries, min(k, len(vectors)))
        block_ids = np.where(rows >= 0, np.asarray(ids, dtype=np.int64)[np.maximum(rows, 0)], -1)
        scores = np.where(rows >= 0, scores, -np.inf)
        merged_scores = np.concatenate([best_scores, scores], axis=1)
        merged_ids = np.concatenate([best_ids, block_ids], axis=1)
        order = np.argsort(-merged_scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(merged_scores, order, axis=1)
        best_ids = np.take_along_axis(merged_ids, order, axis=1)
    return Neighbours(best_scores, best_ids)


def drop_self(ids: np.ndarray, exclude: np.ndarray | None, k: int) -> np.ndarray:
    """Each row of ``ids`` without the id ``exclude[row]``, truncated to ``k`` columns (-1 padded)."""
    if exclude is None:
        return ids[:, :k]
    kept = np.full((len(ids), k), -1, dtype=np.int64)
    for row, (found, own) in enumerate(zip(ids, exclude)):
        others = found[found != own][:k]
        kept[row, : len(others)] = others
    return kept


def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean over queries of |found[:, :k] intersect truth[:, :k]| / (valid truth entries, at most k)."""
    total = 0.0
    for approx, exact in zip(found[:, :k], truth[:, :k]):
        exact = exact[exact >= 0]
        if len(exact):
            total += len(np.intersect1d(approx[approx >= 0], exact)) / len(exact)
    return total / max(1, len(found))


def search_parameter(family: str) -> str | None:
    """The knob that trades speed for recall: ``nprobe`` (IVF), ``efSearch`` (HNSW), None (exact)."""
    return {"ivf": "nprobe", "ivfpq": "nprobe", "hnsw": "efSearch"}.get(family)


def timed_search(index: Any, queries: np.ndarray, k: int, params: dict | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """``(scores, ids, seconds)`` of one batched search after applying ``params``."""
    set_search_params(index, params or {})
    started = time.perf_counter()
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return scores, ids, time.perf_counter() - started


def _candidates(parameter: str, k: int, limit: int) -> list[int]:
    start = 1 if parameter == "nprobe" else max(16, k)
    values, value = [], start
    while value < limit:
        values.append(value)
        value *= 2
    return values + [limit]


def tune(
    index: Any,
    family: str,
    queries: np.ndarray,
    truth: np.ndarray,
    k: int = 10,
    target: float = 0.95,
    exclude: np.ndarray | None = None,
    nlist: int = 0,
) -> dict:
    """The smallest ``nprobe`` / ``efSearch`` whose recall@k reaches ``target`` (doubling, then bisecting).

    ``truth`` holds the exact ids ([Q, >= k], self already dropped when ``exclude`` is given). When the
    target is out of reach the smallest value within 0.01 of the best recall is kept and ``reached`` is False. Returns
    ``{"params", "recall", "k", "target", "reached", "queries", "queries_per_s", "latency_ms", "curve"}``.
    """
    if not 0 < target <= 1:
        raise ValueError(f"target recall must be in (0, 1], got {target}")
    parameter = search_parameter(family)
    extra = 0 if exclude is None else 1
    search_k = min(k + extra, int(index.ntotal))
    curve: list[dict] = []

    def measure(value: int | None) -> dict:
        params = {} if value is None else {parameter: value}
        _, ids, seconds = timed_search(index, queries, search_k, params)
        point = {"params": params, "recall": recall_at(drop_self(ids, exclude, k), truth, k),
                 "queries_per_s": len(queries) / max(seconds, 1e-9), "latency_ms": 1000 * seconds / len(queries)}
        curve.append(point)
        logger.info("%s: recall@%d %.4f, %.0f queries/s", params or "exact", k, point["recall"], point["queries_per_s"])
        return point

    if parameter is None:
        best = measure(None)
    else:
        limit = max(1, nlist) if parameter == "nprobe" else MAX_EF_SEARCH
        best, below = None, None
        for value in _candidates(parameter, k, limit):
            point = measure(value)
            if point["recall"] >= target:
                best = point
                break
            below = value
        if best is None:  # out of reach: the cheapest value on the plateau of the best recall
            top = max(point["recall"] for point in curve)
            best = next(point for point in curve if point["recall"] >= top - 0.01)
        elif below is not None:  # bisect between the last miss and the first hit
            low, high = below, best["params"][parameter]
            for _ in range(BISECT_STEPS):
                middle = (low + high) // 2
                if middle in (low, high):
                    break
                point = measure(middle)
                if point["recall"] >= target:
                    best, high = point, middle
                else:
                    low = middle
        set_search_params(index, best["params"])
    return {
        "params": best["params"],
        "recall": round(best["recall"], 4),
        "k": k,
        "target": target,
        "reached": best["recall"] >= target,
        "queries": int(len(queries)),
        "queries_per_s": round(best["queries_per_s"], 1),
        "latency_ms": round(best["latency_ms"], 4),
        "curve": [{**p, "recall": round(p["recall"], 4), "queries_per_s": round(p["queries_per_s"], 1),
                   "latency_ms": round(p["latency_ms"], 4)} for p in curve],
    }
