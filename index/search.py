"""Load an index directory written by ``index.build`` and answer nearest-neighbour queries.

``Index.load(RUN/index)`` reads ``index.faiss``, ``metadata.parquet`` and ``index.json``, checks that
they agree, and (when faiss sees a GPU) searches on a GPU copy. Sample images are read back from
their shards through the metadata (shard path + key), with a small LRU cache of shard contents so
browsing neighbours does not re-read a tar file per image. No torch is imported.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from index.build import INDEX_FILE, INFO_FILE, METADATA_FILE, gpu_copy
from trainer.data.shards import decode_image, iter_shard

logger = logging.getLogger(__name__)

# faiss GPU brute-force search supports k up to 2048.
GPU_MAX_K = 2048
DEFAULT_SHARD_CACHE = 4


class IndexLoadError(RuntimeError):
    """An index directory that cannot be loaded (corrupt or mutually inconsistent files)."""


class ShardCache:
    """LRU cache of a few shards' image bytes: shard path -> {key: encoded image bytes}."""

    def __init__(self, max_shards: int = DEFAULT_SHARD_CACHE) -> None:
        self.max_shards = max(1, int(max_shards))
        self._shards: OrderedDict[str, dict[str, bytes]] = OrderedDict()
        self._lock = threading.Lock()  # Gradio calls handlers from worker threads

    def images(self, shard: str) -> dict[str, bytes]:
        """The image bytes of every sample in ``shard``, keyed by sample key."""
        with self._lock:
            if shard in self._shards:
                self._shards.move_to_end(shard)
                return self._shards[shard]
        if not os.path.exists(shard):
            raise FileNotFoundError(f"shard {shard!r} named in the index metadata does not exist")
        loaded = {sample.key: sample.image for sample in iter_shard(shard) if sample.image is not None}
        with self._lock:
            self._shards[shard] = loaded
            self._shards.move_to_end(shard)
            while len(self._shards) > self.max_shards:
                self._shards.popitem(last=False)
        return loaded

    def __len__(self) -> int:
        return len(self._shards)


def _read_info(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            info = json.load(handle)
    except json.JSONDecodeError as error:
        raise IndexLoadError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(info, dict):
        raise IndexLoadError(f"{path} must hold a JSON object")
    return info


def _read_faiss(path: Path) -> Any:
    import faiss

    try:
        return faiss.read_index(str(path))
    except Exception as error:  # faiss raises RuntimeError with a C++ message for truncated/corrupt files
        raise IndexLoadError(f"cannot read FAISS index {str(path)!r} (corrupt or not a FAISS file): {error}") from error


def _read_metadata(path: Path) -> dict[str, list]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(str(path))
    except Exception as error:  # pyarrow raises ArrowInvalid and friends for damaged files
        raise IndexLoadError(f"cannot read metadata {str(path)!r}: {error}") from error
    required = {"id", "key", "shard", "label", "label_name", "caption"}
    missing = required - set(table.column_names)
    if missing:
        raise IndexLoadError(f"{path} lacks the column(s) {sorted(missing)}")
    return table.to_pydict()


class Index:
    """A loaded image index: exact inner-product search over L2-normalised embeddings plus metadata."""

    def __init__(
        self,
        directory: Path,
        faiss_index: Any,
        metadata: dict[str, list],
        info: dict,
        max_shards: int = DEFAULT_SHARD_CACHE,
        use_gpu: bool | None = None,
    ) -> None:
        """Prefer ``Index.load``; this constructor takes already read and checked parts."""
        self.directory = directory
        self._cpu_index = faiss_index
        self._search_index, self._gpu_resources = gpu_copy(faiss_index, use_gpu)
        self._metadata = metadata
        self._info = info
        self._row_of = {int(sample_id): row for row, sample_id in enumerate(metadata["id"])}
        self._shards = ShardCache(max_shards)

    @classmethod
    def load(cls, index_dir: str | os.PathLike, use_gpu: bool | None = None, max_shards: int = DEFAULT_SHARD_CACHE) -> "Index":
        """Load and cross-check ``index.faiss``, ``metadata.parquet`` and ``index.json``."""
        directory = Path(index_dir).expanduser().resolve()
        if not directory.is_dir():
            raise FileNotFoundError(f"index directory {str(directory)!r} does not exist")
        for name in (INFO_FILE, INDEX_FILE, METADATA_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"index file {str(directory / name)!r} does not exist")
        info = _read_info(directory / INFO_FILE)
        faiss_index = _read_faiss(directory / INDEX_FILE)
        metadata = _read_metadata(directory / METADATA_FILE)
        cls._check_consistency(directory, info, faiss_index, metadata)
        return cls(directory, faiss_index, metadata, info, max_shards, use_gpu)

    @staticmethod
    def _check_consistency(directory: Path, info: dict, faiss_index: Any, metadata: dict[str, list]) -> None:
        if "dim" in info and int(info["dim"]) != int(faiss_index.d):
            raise IndexLoadError(
                f"{directory / INFO_FILE} says dim={info['dim']} but {INDEX_FILE} holds {faiss_index.d}-dimensional vectors"
            )
        if "count" in info and int(info["count"]) != int(faiss_index.ntotal):
            raise IndexLoadError(
                f"{directory / INFO_FILE} says count={info['count']} but {INDEX_FILE} holds {faiss_index.ntotal} vectors"
            )
        if len(metadata["id"]) != int(faiss_index.ntotal):
            raise IndexLoadError(
                f"{METADATA_FILE} has {len(metadata['id'])} rows but {INDEX_FILE} holds {faiss_index.ntotal} vectors"
            )
        if hasattr(faiss_index, "id_map"):
            import faiss

            stored = faiss.vector_to_array(faiss_index.id_map)
            if not np.array_equal(np.sort(stored), np.sort(np.asarray(metadata["id"], dtype=np.int64))):
                raise IndexLoadError(f"the sample ids in {METADATA_FILE} and {INDEX_FILE} differ; rebuild the index")

    # -- properties ----------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(self._cpu_index.d)

    @property
    def count(self) -> int:
        """Number of indexed samples."""
        return int(self._cpu_index.ntotal)

    @property
    def info(self) -> dict:
        """The parsed ``index.json``."""
        return self._info

    @property
    def on_gpu(self) -> bool:
        """Whether searches run on a GPU copy."""
        return self._gpu_resources is not None

    @property
    def ids(self) -> np.ndarray:
        """All sample ids, in metadata order."""
        return np.asarray(self._metadata["id"], dtype=np.int64)

    # -- queries -------------------------------------------------------------------------------

    def search(self, vectors: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most similar samples for each query: ``(scores float32 [Q, k], ids int64 [Q, k])``.

        ``vectors`` is float32 ``[Q, D]`` (a single ``[D]`` vector is accepted); ``k`` is clamped to the
        collection size. Scores are inner products, i.e. cosine similarities for normalised queries.
        """
        queries = np.asarray(vectors, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.ndim != 2:
            raise ValueError(f"queries must be a [Q, D] array, got shape {queries.shape}")
        if queries.shape[1] != self.dim:
            raise ValueError(f"query dimension {queries.shape[1]} does not match the index dimension {self.dim}")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        k = min(int(k), self.count)
        if self.on_gpu:
            k = min(k, GPU_MAX_K)
        scores, ids = self._search_index.search(np.ascontiguousarray(queries), k)
        return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)

    def records(self, ids: Iterable[int]) -> list[dict]:
        """Metadata rows for ``ids`` in the given order; negative ids (faiss padding) are skipped.

        Raises ``KeyError`` for an id that is not in the index.
        """
        rows = []
        for sample_id in np.asarray(list(ids), dtype=np.int64).ravel():
            if sample_id < 0:
                continue
            row = self._row_of.get(int(sample_id))
            if row is None:
                raise KeyError(f"sample id {int(sample_id)} is not in the index")
            rows.append({column: values[row] for column, values in self._metadata.items()})
        return rows

    def image(self, sample_id: int, mode: str = "RGB"):
        """The sample's image as a PIL image in ``mode``, read from its shard (shards are LRU-cached)."""
        record = self.records([sample_id])
        if not record:
            raise KeyError(f"sample id {sample_id} is not in the index")
        shard, key = record[0]["shard"], record[0]["key"]
        data = self._shards.images(shard).get(key)
        if data is None:
            raise KeyError(f"shard {shard!r} holds no image for key {key!r}")
        return decode_image(data, mode=mode)

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"Index({str(self.directory)!r}, count={self.count}, dim={self.dim}, gpu={self.on_gpu})"


def load(index_dir: str | os.PathLike, **kwargs: Any) -> Index:
    """Shorthand for ``Index.load``."""
    return Index.load(index_dir, **kwargs)


__all__: Sequence[str] = ("Index", "IndexLoadError", "ShardCache", "load")
