"""Exact ground truth, recall@k, and raising ``nprobe`` / ``efSearch`` until a target recall is met.

    truth = exact_neighbours(queries, blocks, k)              # streamed over (vectors, ids) blocks
    result = tune(index, "ivf", queries, truth.ids, k=10, target=0.95, exclude=query_ids)
    result["params"]   # {"nprobe": 24}; also recall, lower_bound, queries_per_s, latency_ms, curve

Recall@k is |approximate top-k  intersect  exact top-k| / k, averaged over queries. When the queries
are stored vectors themselves (``exclude``: their ids), each query's own id is dropped from both lists
before truncating to k, so a query never gets credit for finding itself: that is the held-out
("leave-self-out") measurement used at build time.

A target is met when a one-sided lower confidence bound on recall (``recall_lower_bound``, 95% by
default) reaches it, not the sample mean: the tuning queries are a sample, and stopping at the first
setting whose sample mean crosses the target records a recall that new queries miss about half the
time (more, since the first crossing favours a lucky sample). Indexes with an exact re-ranking stage
(``...,RFlat``) also get their re-ranking depth ``k_factor_rf`` tuned. No torch.
"""
from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from index.devices import set_search_params

logger = logging.getLogger(__name__)

MAX_EF_SEARCH = 4096
BISECT_STEPS = 3
DEFAULT_CONFIDENCE = 0.95
BOUND_METHOD = "wilson-design-effect"
REFINE_FACTORS = (2, 4, 8, 16, 32)  # k_factor_rf tried for indexes with exact re-ranking (RFlat)
SINGLE_TIMING_QUERIES = 100  # batch_size 1 is timed on this many queries, one call each


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


def per_query_recall(found: np.ndarray, truth: np.ndarray, k: int) -> np.ndarray:
    """Recall@k of each query: |found[i, :k] intersect truth[i, :k]| / (valid truth entries, at most k);
    0 for a query without any valid truth entry."""
    values = np.zeros(len(found), dtype=np.float64)
    for row, (approx, exact) in enumerate(zip(found[:, :k], truth[:, :k])):
        exact = exact[exact >= 0]
        if len(exact):
            values[row] = len(np.intersect1d(approx[approx >= 0], exact)) / len(exact)
    return values


def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean over queries of |found[:, :k] intersect truth[:, :k]| / (valid truth entries, at most k)."""
    return float(per_query_recall(found, truth, k).sum() / max(1, len(found)))


class ConfidenceError(ValueError):
    """A confidence level outside (0, 1)."""


def recall_lower_bound(per_query: np.ndarray, k: int, confidence: float = DEFAULT_CONFIDENCE) -> dict:
    """One-sided lower confidence bound on the mean recall@k of the query population, from a sample of
    per-query recalls: ``{"lower_bound", "recall", "design_effect", "effective_hits", "method", "confidence"}``.

    Why not a plain Wilson or Clopper-Pearson bound over the n x k neighbour hits: those treat every hit
    as an independent Bernoulli draw, but the k hits of one query are not independent. A query that sits
    on a cell boundary (IVF) or in a poorly linked part of a graph (HNSW) loses several of its neighbours
    at once, so hits are clustered by query and the binomial variance understates the real one. The
    sampling unit is the query (tuning queries are drawn at random), so the honest variance of the mean
    recall is the between-query one, s^2 / n, with s^2 the sample variance of the per-query recalls. We
    express it as a design effect, ``deff = s^2 / (p (1 - p) / k)`` (at least 1: hits that are more
    independent than Bernoulli draws would be sampling noise), i.e. the n x k hits carry the information
    of ``n k / deff`` independent ones (Kish's effective sample size), and put that effective count into a
    one-sided Wilson score bound at ``z = Phi^-1(confidence)``. Wilson rather than mean - z s / sqrt(n):
    it stays inside [0, 1] and still leaves a margin when every sampled query is perfect (s = 0, where the
    normal bound would claim recall 1 from any sample); e.g. 100 perfect queries at k = 10 give
    1000 / (1000 + 1.645^2) = 0.9973. A bootstrap over queries gives about the same bound at 95% but
    needs thousands of resamples and is random itself; this is closed-form and deterministic.
    """
    if not 0 < confidence < 1:
        raise ConfidenceError(f"confidence must be in (0, 1), e.g. 0.95, got {confidence}")
    values = np.asarray(per_query, dtype=np.float64)
    n = len(values)
    if n == 0 or k < 1:
        return {"lower_bound": 0.0, "recall": 0.0, "design_effect": 1.0, "effective_hits": 0.0,
                "method": BOUND_METHOD, "confidence": confidence}
    mean = float(values.mean())
    binomial = mean * (1 - mean) / k
    sample = float(values.var(ddof=1)) if n > 1 else binomial
    design_effect = max(1.0, sample / binomial) if binomial > 0 else 1.0
    effective = n * k / design_effect
    z = statistics.NormalDist().inv_cdf(confidence)
    centre = mean + z * z / (2 * effective)
    spread = z * math.sqrt(mean * (1 - mean) / effective + z * z / (4 * effective * effective))
    lower = max(0.0, (centre - spread) / (1 + z * z / effective))
    return {"lower_bound": lower, "recall": mean, "design_effect": design_effect, "effective_hits": effective,
            "method": BOUND_METHOD, "confidence": confidence}


def search_parameter(family: str) -> str | None:
    """The knob that trades speed for recall: ``nprobe`` (IVF), ``efSearch`` (HNSW), None (exact)."""
    return {"ivf": "nprobe", "ivfpq": "nprobe", "hnsw": "efSearch"}.get(family)


def timed_search(index: Any, queries: np.ndarray, k: int,
                 params: dict | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """``(scores, ids, seconds)`` of one batched search after applying ``params``."""
    set_search_params(index, params or {})
    started = time.perf_counter()
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return scores, ids, time.perf_counter() - started


def seconds_per_query(index: Any, queries: np.ndarray, k: int, batch_size: int) -> float:
    """Search time per query when queries arrive ``batch_size`` per call (the current parameters).

    Batching changes which index is fastest: exact search over a batch is one BLAS matrix product,
    and faiss parallelises a batch over queries, while one query per call pays per-call overheads and
    leaves cores idle. So the speed used to choose between settings is measured at the intended batch
    size, on up to ``max(batch_size, SINGLE_TIMING_QUERIES)`` queries.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    timed = np.ascontiguousarray(queries[: max(batch_size, SINGLE_TIMING_QUERIES)], dtype=np.float32)
    started = time.perf_counter()
    for first in range(0, len(timed), batch_size):
        index.search(timed[first: first + batch_size], k)
    return (time.perf_counter() - started) / max(1, len(timed))


def refine_stage(index: Any) -> Any:
    """The ``IndexRefine`` (exact re-ranking, factory suffix ``,RFlat``) inside IDMap wrappers, or None; for a set
    of indexes (``faiss.IndexShards``), its first member's (the members share one factory)."""
    import faiss

    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexShards) and inner.count():
        inner = faiss.downcast_index(inner.at(0))
    while isinstance(inner, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        inner = faiss.downcast_index(inner.index)
    return inner if isinstance(inner, faiss.IndexRefine) else None


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
    confidence: float | None = DEFAULT_CONFIDENCE,
    batch_size: int | None = None,
) -> dict:
    """The cheapest ``nprobe`` / ``efSearch`` (and, with exact re-ranking, ``k_factor_rf``) whose recall@k
    reaches ``target`` (doubling, then bisecting).

    ``truth`` holds the exact ids ([Q, >= k], self already dropped when ``exclude`` is given). "Reaches"
    means the one-sided ``confidence`` lower bound of ``recall_lower_bound`` is >= ``target``, so that the
    recorded recall holds for new queries; ``confidence=None`` compares the sample mean (the optimistic
    rule). Speed is timed ``batch_size`` queries per call (None: all queries in one call); with a re-ranking
    stage, each ``k_factor_rf`` in ``REFINE_FACTORS`` gets its smallest passing knob and the fastest pair is
    kept. When the target is out of reach the smallest value within 0.01 of the best recall is kept and
    ``reached`` is False. Returns ``{"params", "recall", "lower_bound", "bound", "k", "target", "reached",
    "queries", "batch_size", "queries_per_s", "latency_ms", "curve"}``.
    """
    if not 0 < target <= 1:
        raise ValueError(f"target recall must be in (0, 1], got {target}")
    if confidence is not None and not 0 < confidence < 1:
        raise ConfidenceError(f"confidence must be in (0, 1), e.g. 0.95, or None for the sample mean; got {confidence}")
    parameter = search_parameter(family)
    extra = 0 if exclude is None else 1
    search_k = min(k + extra, int(index.ntotal))
    curve: list[dict] = []

    def measure(params: dict) -> dict:
        _, ids, seconds = timed_search(index, queries, search_k, params)
        if batch_size is not None and batch_size < len(queries):
            seconds = seconds_per_query(index, queries, search_k, batch_size) * len(queries)
        values = per_query_recall(drop_self(ids, exclude, k), truth, k)
        bound = recall_lower_bound(values, k, confidence or DEFAULT_CONFIDENCE)
        point = {"params": params, "recall": float(values.sum() / max(1, len(values))),
                 "lower_bound": bound["lower_bound"] if confidence else None, "bound": bound,
                 "queries_per_s": len(queries) / max(seconds, 1e-9), "latency_ms": 1000 * seconds / len(queries)}
        point["passes"] = (point["lower_bound"] if confidence else point["recall"]) >= target
        curve.append(point)
        logger.info("%s: recall@%d %.4f (lower bound %.4f), %.0f queries/s", params or "exact", k, point["recall"],
                    bound["lower_bound"], point["queries_per_s"])
        return point

    def cheapest(fixed: dict) -> dict:
        """The smallest knob value that passes with ``fixed`` parameters (or the plateau's cheapest)."""
        if parameter is None:
            point = measure(dict(fixed))
            if family == "flat":  # exact search: recall is 1 by construction, no sampling error to bound
                point["passes"] = point["passes"] or point["recall"] >= target
            return point
        limit = max(1, nlist) if parameter == "nprobe" else MAX_EF_SEARCH
        best, below, tried = None, None, []
        for value in _candidates(parameter, k, limit):
            point = measure({**fixed, parameter: value})
            tried.append(point)
            if point["passes"]:
                best = point
                break
            below = value
        if best is None:  # out of reach: the cheapest value on the plateau of the best recall
            top = max(point["recall"] for point in tried)
            return next(point for point in tried if point["recall"] >= top - 0.01)
        if below is not None:  # bisect between the last miss and the first hit
            low, high = below, best["params"][parameter]
            for _ in range(BISECT_STEPS):
                middle = (low + high) // 2
                if middle in (low, high):
                    break
                point = measure({**fixed, parameter: middle})
                if point["passes"]:
                    best, high = point, middle
                else:
                    low = middle
        return best

    if refine_stage(index) is not None:
        options = [cheapest({"k_factor_rf": factor}) for factor in REFINE_FACTORS]
        passing = [point for point in options if point["passes"]]
        best = (max(passing, key=lambda point: point["queries_per_s"]) if passing
                else max(options, key=lambda point: point["recall"]))
    else:
        best = cheapest({})
    set_search_params(index, best["params"])
    bound = best["bound"]
    return {
        "params": best["params"],
        "recall": round(best["recall"], 4),
        "lower_bound": None if best["lower_bound"] is None else round(best["lower_bound"], 4),
        "bound": {"method": bound["method"] if confidence else "none (sample mean)", "confidence": confidence,
                  "design_effect": round(bound["design_effect"], 3),
                  "effective_hits": round(bound["effective_hits"], 1)},
        "k": k,
        "target": target,
        "reached": bool(best["passes"]),
        "queries": int(len(queries)),
        "batch_size": int(batch_size or len(queries)),
        "queries_per_s": round(best["queries_per_s"], 1),
        "latency_ms": round(best["latency_ms"], 4),
        "curve": [{"params": p["params"], "recall": round(p["recall"], 4),
                   "lower_bound": None if p["lower_bound"] is None else round(p["lower_bound"], 4),
                   "queries_per_s": round(p["queries_per_s"], 1), "latency_ms": round(p["latency_ms"], 4)}
                  for p in curve],
    }
