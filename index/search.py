"""Load an index directory written by ``index.build`` and answer nearest-neighbour queries.

``Index.load(RUN/index)`` reads ``index.json``, the FAISS index and the metadata it names
(``index.store``), checks that they agree, applies the tuned search parameters (``nprobe`` /
``efSearch``) and, when faiss sees GPUs, searches on a GPU copy (sharded over several). Searches whose
``k`` or ``nprobe`` exceed the GPU limits run on the CPU copy with a warning. ``mmap=True`` (or an
index file larger than half the free memory) maps the index instead of reading it, for indexes larger
than RAM. A set of indexes (``index.merge merge --num-indexes N``) loads as one ``Index`` that searches
every member and merges by score. Sample images are read back from their shards through the metadata
(shard path + key), with a small LRU cache of shard contents. No torch is imported.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from index import devices
from index.devices import set_search_params
from index.store import (INFO_FILE, IndexLoadError, data_files, is_set, member_directories, read_faiss, read_info,
                         read_metadata, stored_ids)
from trainer.data import storage
from trainer.data.shards import decode_image, iter_shard

logger = logging.getLogger(__name__)

GPU_MAX_K = devices.GPU_MAX_K
DEFAULT_SHARD_CACHE = 4
ID_CHECK_MAX = 50_000_000


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
        if not storage.exists(shard):
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


class Index:
    """A loaded image index: approximate or exact inner-product search over L2-normalised embeddings plus metadata."""

    def __init__(
        self,
        directory: Path,
        faiss_index: Any,
        metadata: Any,
        info: dict,
        max_shards: int = DEFAULT_SHARD_CACHE,
        use_gpu: bool | None = None,
    ) -> None:
        """Prefer ``Index.load``; this constructor takes already read and checked parts
        (``metadata``: a ``pyarrow.Table`` or a dict of columns)."""
        import pyarrow as pa

        self.directory = directory
        self._cpu_index = faiss_index
        self._info = info
        self.search_params = dict(info.get("search_params") or {})
        set_search_params(faiss_index, self.search_params)
        self._search_index, self._gpu_resources = devices.to_gpu(faiss_index, use_gpu)
        if self._gpu_resources is not None:
            set_search_params(self._search_index, self._gpu_limited(self.search_params))
        self._metadata = metadata if isinstance(metadata, pa.Table) else pa.table(metadata)
        self._ids = self._metadata.column("id").to_numpy().astype(np.int64)
        self._id_order = np.argsort(self._ids, kind="stable")
        self._sorted_ids = self._ids[self._id_order]
        self._shards = ShardCache(max_shards)
        self._lock = threading.Lock()  # search parameters are index state; Gradio calls from threads

    @classmethod
    def load(cls, index_dir: str | os.PathLike, use_gpu: bool | None = None, max_shards: int = DEFAULT_SHARD_CACHE,
             mmap: bool | None = None) -> "Index":
        """Load and cross-check the files ``index.json`` names (see ``index.store``)."""
        directory = Path(index_dir).expanduser().resolve()
        if not directory.is_dir():
            raise FileNotFoundError(f"index directory {str(directory)!r} does not exist")
        info = read_info(directory)
        if is_set(info):
            return cls._load_set(directory, info, use_gpu, max_shards, mmap)
        faiss_index, metadata, mmap = cls._read_checked(directory, info, mmap)
        gpu = (False if use_gpu is None else use_gpu) if mmap else use_gpu  # a mapped index stays on the CPU by default
        return cls(directory, faiss_index, metadata, info, max_shards, gpu)

    @classmethod
    def _read_checked(cls, directory: Path, info: dict, mmap: bool | None) -> tuple[Any, Any, bool]:
        """``(faiss index, metadata table, mapped)`` of one index directory, cross-checked."""
        files = data_files(directory, info)
        for path in files.values():
            if not path.is_file():
                raise FileNotFoundError(f"index file {str(path)!r} does not exist")
        if mmap is None:
            mmap = files["index"].stat().st_size > _available_memory() // 2
        faiss_index = read_faiss(files["index"], mmap=mmap, family=info.get("family"), on_disk="lists" in files)
        metadata = read_metadata(files["metadata"])
        cls._check_consistency(directory, info, faiss_index, metadata, files)
        return faiss_index, metadata, bool(mmap)

    @classmethod
    def _load_set(cls, directory: Path, info: dict, use_gpu: bool | None, max_shards: int,
                  mmap: bool | None) -> "Index":
        """A set of member indexes (``index.store``) searched as one: a ``faiss.IndexShards`` queries every
        member in its own thread and keeps the best ``k`` by score; the metadata tables are concatenated in
        member order. Each member is mapped rather than read when it alone is larger than half the free memory
        (the set exists because the whole would not fit); with GPUs, member ``j`` goes to GPU ``j % count``."""
        import faiss
        import pyarrow as pa

        members, tables, mapped = faiss.IndexShards(int(info["dim"]), True, False), [], False
        for member in member_directories(directory, info):
            member_dir = Path(member)
            if not member_dir.is_dir():
                raise FileNotFoundError(f"index set member {str(member_dir)!r} named in {directory / INFO_FILE} "
                                        "does not exist")
            member_index, table, member_mapped = cls._read_checked(member_dir, read_info(member_dir), mmap)
            if int(member_index.d) != int(info["dim"]):
                raise IndexLoadError(f"{directory / INFO_FILE} says dim={info['dim']} but member {member_dir.name} "
                                     f"holds {member_index.d}-dimensional vectors")
            members.add_shard(member_index)
            tables.append(table)
            mapped = mapped or member_mapped
        if int(info.get("count", members.ntotal)) != int(members.ntotal):  # an update stopped between commits
            logger.warning("%s says count=%s but its members hold %d vectors (the members are what is searched)",
                           directory / INFO_FILE, info.get("count"), members.ntotal)
        metadata = pa.concat_tables(tables)
        ids = metadata.column("id").to_numpy()
        if len(ids) <= ID_CHECK_MAX and len(np.unique(ids)) != len(ids):
            raise IndexLoadError(f"the members of {directory} share sample ids; rebuild the set")
        gpu = (False if use_gpu is None else use_gpu) if mapped else use_gpu
        return cls(directory, members, metadata, info, max_shards, gpu)

    @staticmethod
    def _check_consistency(directory: Path, info: dict, faiss_index: Any, metadata: Any, files: dict) -> None:
        index_name, metadata_name = files["index"].name, files["metadata"].name
        if "dim" in info and int(info["dim"]) != int(faiss_index.d):
            raise IndexLoadError(
                f"{directory / INFO_FILE} says dim={info['dim']} but {index_name} holds {faiss_index.d}-dimensional vectors"
            )
        if "count" in info and int(info["count"]) != int(faiss_index.ntotal):
            raise IndexLoadError(
                f"{directory / INFO_FILE} says count={info['count']} but {index_name} holds {faiss_index.ntotal} vectors"
            )
        if metadata.num_rows != int(faiss_index.ntotal):
            raise IndexLoadError(f"{metadata_name} has {metadata.num_rows} rows but {index_name} holds {faiss_index.ntotal} vectors")
        if faiss_index.ntotal <= ID_CHECK_MAX:  # reading every id of a billion-vector index would take minutes
            stored = stored_ids(faiss_index)
            if stored is not None and not np.array_equal(np.sort(stored), np.sort(metadata.column("id").to_numpy())):
                raise IndexLoadError(f"the sample ids in {metadata_name} and {index_name} differ; rebuild the index")

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
        return self._ids

    @property
    def metadata(self) -> Any:
        """The metadata ``pyarrow.Table`` (memory-mapped), one row per vector, in ``ids`` order."""
        return self._metadata

    @property
    def faiss_index(self) -> Any:
        """The CPU FAISS index (for evaluation and updates)."""
        return self._cpu_index

    # -- queries -------------------------------------------------------------------------------

    @staticmethod
    def _gpu_limited(params: dict) -> dict:
        return {name: min(int(value), devices.GPU_MAX_NPROBE) if name == "nprobe" else value for name, value in params.items()}

    def search(self, vectors: np.ndarray, k: int = 10, params: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most similar samples for each query: ``(scores float32 [Q, k], ids int64 [Q, k])``.

        ``vectors`` is float32 ``[Q, D]`` (a single ``[D]`` vector is accepted); ``k`` is clamped to the
        collection size (approximate indexes may pad with id -1, score -inf). Scores are inner products,
        i.e. cosine similarities for normalised queries. ``params`` overrides the tuned search
        parameters for this call (e.g. ``{"nprobe": 64}``).
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
        wanted = {**self.search_params, **(params or {})}
        index = self._search_index
        if self.on_gpu:
            reason = devices.exceeds_gpu_limits(k, wanted)
            if reason:
                logger.warning("%s exceeds the GPU limits; searching on the CPU copy", reason)
                index = self._cpu_index
        with self._lock:
            if params:
                set_search_params(index, wanted)
            try:
                scores, ids = index.search(np.ascontiguousarray(queries), k)
            finally:
                if params:
                    set_search_params(index, self.search_params)
        return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)

    def rows(self, ids: Iterable[int]) -> np.ndarray:
        """Metadata row numbers of ``ids``; ``KeyError`` for an id that is not in the index."""
        wanted = np.asarray(list(ids), dtype=np.int64).ravel()
        positions = np.searchsorted(self._sorted_ids, wanted)
        positions = np.minimum(positions, len(self._sorted_ids) - 1)
        missing = self._sorted_ids[positions] != wanted
        if missing.any():
            raise KeyError(f"sample id {int(wanted[missing][0])} is not in the index")
        return self._id_order[positions]

    def records(self, ids: Iterable[int]) -> list[dict]:
        """Metadata rows for ``ids`` in the given order; negative ids (faiss padding) are skipped.

        Raises ``KeyError`` for an id that is not in the index.
        """
        wanted = [int(i) for i in np.asarray(list(ids), dtype=np.int64).ravel() if i >= 0]
        if not wanted:
            return []
        return self._metadata.take(self.rows(wanted)).to_pylist()

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
        return (f"Index({str(self.directory)!r}, count={self.count}, dim={self.dim}, "
                f"factory={self._info.get('factory')!r}, gpu={self.on_gpu})")


def _available_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def load(index_dir: str | os.PathLike, **kwargs: Any) -> Index:
    """Shorthand for ``Index.load``."""
    return Index.load(index_dir, **kwargs)


__all__: Sequence[str] = ("Index", "IndexLoadError", "ShardCache", "load")
