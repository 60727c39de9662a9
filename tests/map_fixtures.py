"""A synthetic index for the map's tests and benchmark: clustered random vectors in a Flat index, with metadata
pointing at real (generated) train/test shards so thumbnails, splits and searches work.

Ids are ``ID_BASE + 3 * row`` (never equal to the row), so a mix-up of map positions, metadata rows and
sample ids shows up as wrong answers.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

ID_BASE = 10_000
CLUSTER_NAMES = [f"c{number}" for number in range(10)]


def make_map_shards(directory: Path, per_shard: int = 40) -> list[tuple[Path, list[str]]]:
    """Two generated shards, ``train-000000.tar`` and ``test-000000.tar``, with their sample keys."""
    try:
        from onnx_fixtures import make_shard
    except ImportError:  # tests/ imported as a package
        from tests.onnx_fixtures import make_shard

    shards = []
    for number, split in enumerate(("train", "test")):
        path = make_shard(Path(directory) / f"{split}-000000.tar", count=per_shard, start=number * per_shard,
                          seed=number)
        shards.append((path, [f"sample_{number * per_shard + i:06d}" for i in range(per_shard)]))
    return shards


def clustered_vectors(count: int, dim: int, clusters: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(unit vectors [count, dim] float32, cluster of each): tight blobs around random centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    assigned = np.arange(count) % clusters
    vectors = centres[assigned] + 0.25 * rng.normal(size=(count, dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32), assigned


def make_map_index(directory: Path, shards: list[tuple[Path, list[str]]], count: int, dim: int = 16,
                   clusters: int = 10, seed: int = 0) -> Path:
    """Write an ``IDMap2,Flat`` index of ``count`` clustered vectors to ``directory`` (``index.store.commit``).
    Row ``i`` belongs to shard ``i % 2`` (train/test), label ``c<cluster>``."""
    import faiss
    import pyarrow as pa

    from index.store import commit

    vectors, assigned = clustered_vectors(count, dim, clusters, seed)
    ids = ID_BASE + 3 * np.arange(count, dtype=np.int64)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    index.add_with_ids(vectors, ids)
    shard_of = np.arange(count) % len(shards)
    keys = [shards[s][1][(i // len(shards)) % len(shards[s][1])] for i, s in enumerate(shard_of)]
    table = pa.table({
        "id": ids,
        "key": keys,
        "shard": [str(shards[s][0]) for s in shard_of],
        "label": assigned.astype(np.int64),
        "label_name": [CLUSTER_NAMES[c % len(CLUSTER_NAMES)] for c in assigned],
        "caption": [f"point {i}" for i in range(count)],
    })
    info = {"factory": "IDMap2,Flat", "family": "flat", "metric": "inner_product", "dim": dim, "count": count,
            "search_params": {}, "shards": [str(path) for path, _ in shards]}
    commit(directory, index, table, info)
    return Path(directory)
