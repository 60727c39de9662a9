"""What the app serves: one encoder with its index (plus an optional caption index), and a cached sample.

The sample (ids, metadata, images, embeddings of up to ``max(map_points, diagnostics_count)`` random
indexed images) feeds the diagnostics. The map draws every indexed point up to ``map_limit``
(``app.projection``), not this sample. The sample is drawn once, lazily, with a fixed seed; embeddings are read back
from the FAISS index when it stores them (Flat, HNSW, IVF-Flat via the id map) and re-encoded from
the shard images otherwise (compressed indexes).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.projection import MAP_LIMIT  # noqa: F401 - the map draws every indexed point up to this many
from app.thumbnails import ThumbnailStore

MAP_POINTS = 2000
DIAGNOSTICS_COUNT = 1000


@dataclass
class Sample:
    ids: np.ndarray
    records: list[dict]
    images: list[Any]
    vectors: np.ndarray


def stored_embeddings(index: Any, ids: np.ndarray) -> np.ndarray | None:
    """The vectors the index holds for ``ids`` (float32 [n, D]), or None when it cannot give them back."""
    faiss_index = getattr(index, "faiss_index", None)
    if faiss_index is None:
        return None
    try:
        vectors = np.stack([faiss_index.reconstruct(int(i)) for i in ids]).astype(np.float32)
    except (RuntimeError, AttributeError, TypeError):
        return None
    if vectors.shape[1] != index.dim or not np.all(np.isfinite(vectors)):
        return None
    return vectors


@dataclass
class Collection:
    """An encoder, its searchable indexes by name (the first holds image embeddings) and the shard reader."""

    encoder: Any
    indexes: dict[str, Any]
    thumbs: ThumbnailStore = field(default_factory=ThumbnailStore)
    name: str = "A"
    encoder_dir: str | None = None
    metrics_path: Path | None = None
    map_points: int = MAP_POINTS
    map_limit: int = MAP_LIMIT
    diagnostics_count: int = DIAGNOSTICS_COUNT
    seed: int = 0
    _cache: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _key_locks: dict = field(default_factory=dict, repr=False)

    @property
    def index(self) -> Any:
        """The image index (the first one)."""
        return next(iter(self.indexes.values()))

    def index_named(self, name: str | None) -> Any:
        return self.indexes.get(name or "", self.index)

    def cached(self, key: Any, make: Any) -> Any:
        """``make()`` once per ``key``: one lock per key keeps two browser tabs from computing it twice,
        while ``make`` may itself use other cached values (diagnostics -> sample)."""
        with self._lock:
            if key in self._cache:
                return self._cache[key]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            if key not in self._cache:
                self._cache[key] = make()
            return self._cache[key]

    @property
    def captioner(self) -> Any:
        """The encoder export's caption generator (CoCa models), loaded once; None when it has none."""
        from app.search import load_captioner

        return self.cached("captioner", lambda: load_captioner(self.encoder))

    def sample(self) -> Sample:
        return self.cached("sample", self._draw_sample)

    def _draw_sample(self) -> Sample:
        index = self.index
        count = min(index.count, max(self.map_points, self.diagnostics_count))
        rng = np.random.default_rng(self.seed)
        ids = np.asarray(index.ids, dtype=np.int64)[rng.choice(index.count, size=count, replace=False)]
        records = index.records(ids)
        images = self.thumbs.images(records)
        vectors = stored_embeddings(index, ids)
        if vectors is None:
            vectors = self.encoder.encode_images(images)
        return Sample(ids=ids, records=records, images=images, vectors=vectors)
