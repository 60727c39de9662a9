"""``python -m index.build --engine ray``: one IVF index from extracted embeddings, filled by Ray tasks.

    python -m index.build --engine ray --address auto --embeddings EMB --output RUN/index [--num-parts N] [--on-disk]

The steps of ``index.merge`` with a scheduler instead of hand-launched processes:

1. train the shared quantizer once, here (``index.merge.train``: the same random sample and the same
   inner-product-preserving projections as the single-machine ``index.build``, so the result equals it);
2. fill ``N`` parts as Ray tasks (``index.merge.fill_part``; part ``i`` takes the embeddings parts
   ``i, i + N, ...``); each task gets the trained index through the object store and returns its filled
   index and metadata, which the driver writes as ``part-<i>-of-<N>``, so only the driver needs write
   access (workers read the embeddings: shared storage or URLs). A task whose worker or node dies is
   retried by Ray (``max_retries``); the tasks are pure, so a retry is safe;
3. merge the parts (``index.merge.merge``): in RAM, or ``--on-disk`` into one memory-mapped inverted-list
   file for collections larger than RAM, then tune ``nprobe`` against exact search as usual. When one index
   would not fit a serving machine, ``--max-index-size 40G`` (or ``--num-indexes N``) merges into a set of
   member indexes instead, each at most that size, which ``Index.load`` searches as one (``index.store``).

A flat or HNSW choice (too small for lists, or a graph) cannot be merged from parts: without ``--index``
the factory is an ``IVF<n>,Flat`` as ``index.merge.train`` picks; ``--index`` must name an IVF factory
(with ``,RFlat`` re-ranking it merges in RAM, not ``--on-disk``). The parts live in a temporary directory beside the
output and are removed after the merge. An output URL (``s3://...``) is merged in a local staging directory
(``--on-disk`` lists included) and uploaded, ``index.json`` last (``index.store.publish``). No torch; Ray is
imported only when this runs.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from export.ray_extract import connect, require_ray
from index import merge as merging
from trainer.data import storage

logger = logging.getLogger(__name__)


def fill_remote(trained: np.ndarray, dim: int, embeddings: str, part: int, num_parts: int,
                use_gpu: bool | None) -> tuple[np.ndarray, Any]:
    """Ray task body: ``(serialised filled index, metadata table)`` of part ``part`` of ``num_parts``."""
    import faiss

    index, table = merging.fill_part(faiss.deserialize_index(trained), dim, embeddings, part, num_parts, use_gpu)
    return faiss.serialize_index(index), table


def build_ray(
    embeddings: str | os.PathLike,
    output_dir: str | os.PathLike,
    factory: str | None = None,
    max_memory: int | None = None,
    num_parts: int | None = None,
    on_disk: bool = False,
    num_indexes: int = 1,
    max_index_size: int | None = None,
    address: str | None = None,
    target_recall: float = 0.95,
    recall_k: int = 10,
    tune_queries: int = 1000,
    train_size: int | None = None,
    use_gpu: bool | None = None,
) -> dict:
    """Train once, fill ``num_parts`` parts on Ray (default: one per CPU, or GPU, of the cluster, at most one
    per embeddings part), merge into ``output_dir`` (a set of indexes with ``num_indexes`` > 1 or
    ``max_index_size``); returns the ``index.json`` dictionary (with
    ``ray_parts`` and ``ray_seconds`` added)."""
    import faiss
    from export.embeddings import part_names

    from index.store import publish

    ray = require_ray()
    if factory:
        merging.check_on_disk(factory, on_disk)  # before any work
    embeddings = storage.absolute(embeddings)  # a local path or a URL (export.embeddings reads both)
    remote = storage.is_url(output_dir)
    if remote:  # merged in a local staging directory, then uploaded with index.json last (index.store.publish)
        staging = Path(tempfile.mkdtemp(prefix="manyview-ray-index-"))
        output, parts_dir = staging / "index", staging / "parts"
        parts_dir.mkdir()
    else:
        output = Path(output_dir).resolve()
        output.parent.mkdir(parents=True, exist_ok=True)
        parts_dir = Path(tempfile.mkdtemp(prefix=f".{output.name}.parts-", dir=output.parent))
    started_ray = False
    try:
        started = time.perf_counter()
        plan = merging.train(embeddings, parts_dir, factory, max_memory, train_size, use_gpu)
        logger.info("trained %s on %d vectors", plan["factory"], plan["train_size"])
        started_ray = connect(address)
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        slots = gpus or max(1, int(resources.get("CPU", 1)))
        available = len(part_names(embeddings))
        count = max(1, min(num_parts or slots, available))
        trained = ray.put(faiss.serialize_index(faiss.read_index(str(parts_dir / merging.TRAINED_FILE))))
        task = ray.remote(fill_remote).options(num_cpus=1, num_gpus=1 if gpus else 0, max_retries=3)
        pending = {task.remote(trained, int(plan["dim"]), embeddings, part, count, use_gpu): part
                   for part in range(count)}
        while pending:  # write each part as it arrives, so the driver holds one filled part at a time
            (ready,), _ = ray.wait(list(pending), num_returns=1)
            part = pending.pop(ready)
            data, table = ray.get(ready)
            merging.write_part(parts_dir, part, count, faiss.deserialize_index(data), table)
            del data, table
        ray_seconds = time.perf_counter() - started
        info = merging.merge(parts_dir, output, on_disk=on_disk, target_recall=target_recall, recall_k=recall_k,
                             tune_queries=tune_queries, num_indexes=num_indexes, max_index_size=max_index_size)
        if remote:
            info = publish(output, os.fspath(output_dir))
    finally:
        if started_ray:
            ray.shutdown()
        shutil.rmtree(parts_dir.parent if remote else parts_dir, ignore_errors=True)
    logger.info("merged %d part(s) filled on Ray into %s", count, storage.public(os.fspath(output_dir)))
    return {**info, "ray_parts": count, "ray_seconds": round(ray_seconds, 3)}
