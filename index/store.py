"""An index directory on disk: generations committed by one atomic write of ``index.json``.

    RUN/index/index.json                 the commit point: factory, metric, dim, count, tuned search
                                         parameters, ... and ``files`` naming the current generation
    RUN/index/index-<gen>.faiss          the FAISS index (always written from its CPU copy)
    RUN/index/metadata-<gen>.parquet     id, key, shard, label, label_name, caption (one row per vector)
    RUN/index/lists-<gen>.ivfdata        only for indexes merged on disk (``index.merge --on-disk``)

A *set* of indexes (``index.merge merge --num-indexes N``, for collections one index cannot hold) is a
directory whose ``index.json`` names ``members``: ordinary index directories beside it, each loadable and
servable alone, all filled from one trained quantizer, so a search of every member merged by score equals
the search of the one merged index (with ``,RFlat`` re-ranking, each member re-ranks its own candidates: at
least as many true neighbours):

    RUN/index/index.json                 the set's commit point: members, dim, count, factory, tuned parameters
    RUN/index/member-<gen>-<j>-of-<n>/   ordinary index directories (the layout above)

Member names carry the set's generation: a new set is written beside the old one and replaces it when its
``index.json`` is replaced (``commit_set``), after which the old members are deleted.

A write (build, add, remove, merge) puts the new generation's files next to the old ones, then
replaces ``index.json`` with ``os.replace`` and only then deletes the previous generation. A crash at
any point leaves an ``index.json`` that names complete, mutually consistent files. Writers hold an
advisory lock (``.lock``) so two writers never interleave. Directories written before generations
existed (``index.faiss`` + ``metadata.parquet``, no ``files`` entry) still load.

The directory may be a URL (``s3://bucket/index``; ``trainer.data.storage``): ``commit`` then writes the
generation into a local temporary directory and uploads its files, ``index.json`` last, so a reader never
sees a half-written index; the previous generation's objects are deleted after that. Object stores have no
locks: run one writer per URL. ``fetch_index`` copies a remote index into a local cache for loading.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from export.contract import read_json_object
from trainer.data import storage

logger = logging.getLogger(__name__)

INFO_FILE = "index.json"
LEGACY_FILES = {"index": "index.faiss", "metadata": "metadata.parquet"}
METADATA_COLUMNS = ("id", "key", "shard", "label", "label_name", "caption")
LOCK_FILE = ".lock"
_GENERATION = re.compile(r"^(index|metadata|lists)-(\d{6})-[0-9a-f]{6}\.(faiss|parquet|ivfdata)$")
_MEMBER = re.compile(r"^member-(\d{6})-[0-9a-f]{6}-\d{5}-of-\d{5}$")
MEMBERS_KEY = "members"


class IndexLoadError(RuntimeError):
    """An index directory that cannot be loaded (corrupt or mutually inconsistent files)."""


def read_info(directory: str | os.PathLike) -> dict:
    """The parsed ``index.json`` (of a directory or URL); ``FileNotFoundError`` when absent, ``IndexLoadError`` when
    not JSON."""
    if not storage.is_url(directory):
        return read_json_object(Path(directory) / INFO_FILE, IndexLoadError, "index")
    location = storage.join(directory, INFO_FILE)
    try:
        info = json.loads(storage.read_bytes(location).decode("utf-8"))
    except FileNotFoundError as error:
        raise FileNotFoundError(f"index file {storage.public(location)!r} does not exist") from error
    except ValueError as error:
        raise IndexLoadError(f"{storage.public(location)} is not valid JSON: {error}") from error
    if not isinstance(info, dict):
        raise IndexLoadError(f"{storage.public(location)} must hold a JSON object, found {type(info).__name__}")
    return info


def is_set(info: dict) -> bool:
    """Whether ``info`` (an ``index.json``) describes a set of member indexes rather than one index."""
    return bool(info.get(MEMBERS_KEY))


def member_name(generation: str, member: int, count: int) -> str:
    """The directory name of member ``member`` of ``count`` in a set committed as ``generation``."""
    return f"member-{generation}-{member:05d}-of-{count:05d}"


def member_directories(directory: str | os.PathLike, info: dict) -> list[str]:
    """The member directories (paths or URLs) a set's ``info`` names, in order."""
    return [storage.join(directory, name) if storage.is_url(directory) else os.path.join(directory, name)
            for name in info.get(MEMBERS_KEY) or []]


def commit_set(directory: str | os.PathLike, members: list[str], info: dict) -> dict:
    """Commit a set whose ``members`` (directory names under ``directory``) are already committed: write the
    set's ``index.json`` (the commit point), then delete the previous set's members and any single index the
    directory held before. Returns the committed info."""
    output = Path(directory)
    for name in members:
        if not _MEMBER.match(name) or not (output / name / INFO_FILE).is_file():
            raise ValueError(f"{output / name} is not a committed member of this set")
    info = {**info, MEMBERS_KEY: list(members)}
    info.pop("files", None)
    update_info(output, info, replace=True)
    remove_stale(output, info)
    return info


def update_info(directory: str | os.PathLike, changes: dict, replace: bool = False) -> dict:
    """Rewrite ``directory/index.json`` atomically with ``changes`` merged in (or, with ``replace``, as
    ``changes``); the data files are untouched. Returns the new info."""
    output = Path(directory)
    info = dict(changes) if replace else {**read_info(output), **changes}
    storage.replace_local(output / INFO_FILE, lambda temporary: _write_json(Path(temporary), info))
    return info


def data_files(directory: str | os.PathLike, info: dict) -> dict[str, Path]:
    """Paths of the current generation's files (``index``, ``metadata``, maybe ``lists``)."""
    names = dict(LEGACY_FILES)
    names.update(info.get("files") or {})
    return {role: Path(directory) / name for role, name in names.items()}


def next_generation(info: dict | None) -> str:
    """``<counter>-<random>``: ordered, and unique even if two writers ignore the lock."""
    previous = 0
    for name in ((info or {}).get("files") or {}).values():
        match = _GENERATION.match(name)
        if match:
            previous = max(previous, int(match.group(2)))
    for name in (info or {}).get(MEMBERS_KEY) or []:  # a set's generation is in its member names
        match = _MEMBER.match(name)
        if match:
            previous = max(previous, int(match.group(1)))
    return f"{previous + 1:06d}-{uuid.uuid4().hex[:6]}"


@contextlib.contextmanager
def writer_lock(directory: str | os.PathLike) -> Iterator[None]:
    """Exclusive advisory lock on the index directory for the duration of a write (none for URLs: object stores
    have no locks, so run one writer per URL)."""
    if storage.is_url(directory):
        yield
        return
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            raise RuntimeError(f"another process is writing {path} (lock {path / LOCK_FILE}); "
                               "try again later") from error
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def commit(directory: str | os.PathLike, cpu_index: Any, table: Any, info: dict,
           generation: str | None = None, extra_files: dict[str, str] | None = None) -> dict:
    """Write a new generation (index, metadata, then ``index.json``) and drop the previous one.

    ``extra_files`` (role -> file name already written in ``directory`` for this generation, e.g.
    the on-disk lists) are recorded in ``files``. ``directory`` may be a URL (``commit_remote``). Returns the
    committed info.
    """
    import faiss
    import pyarrow.parquet as pq

    if storage.is_url(directory):
        return commit_remote(os.fspath(directory), cpu_index, table, info, generation, extra_files)

    output = Path(directory)
    output.mkdir(parents=True, exist_ok=True)
    previous = read_info(output) if (output / INFO_FILE).is_file() else None
    generation = generation or next_generation(previous)
    files = {"index": f"index-{generation}.faiss", "metadata": f"metadata-{generation}.parquet", **(extra_files or {})}
    info = {**info, "files": files}
    info_tmp = output / f".{INFO_FILE}.tmp-{uuid.uuid4().hex[:8]}"
    written = [output / files["index"], output / files["metadata"], info_tmp]
    try:
        faiss.write_index(cpu_index, str(output / files["index"]))
        pq.write_table(table, str(output / files["metadata"]))
        _write_json(info_tmp, info)
        os.replace(info_tmp, output / INFO_FILE)  # the commit point
    except BaseException:
        for path in written + [output / name for name in (extra_files or {}).values()]:
            if path.exists():
                path.unlink()
        raise
    remove_stale(output, info)
    return info


def commit_remote(url: str, cpu_index: Any, table: Any, info: dict, generation: str | None = None,
                  extra_files: dict[str, str] | None = None) -> dict:
    """``commit`` to a URL: the generation is written into a local temporary directory, its files are uploaded
    (one PUT each), then ``index.json`` (the commit point), and only then the previous generation is deleted."""
    if extra_files:
        raise ValueError(f"{storage.public(url)}: an index with on-disk inverted lists cannot be written to a URL; "
                         "merge it into a local directory (index.merge --on-disk) and serve it from there")
    try:
        previous = read_info(url)
    except FileNotFoundError:
        previous = None
    generation = generation or next_generation(previous)
    with tempfile.TemporaryDirectory(prefix="manyview-index-") as staging:
        commit(staging, cpu_index, table, info, generation)
        return publish(staging, url)


def publish(local_dir: str | os.PathLike, url: str) -> dict:
    """Upload the index committed in ``local_dir`` to ``url``: the files of its generation (index, metadata,
    on-disk lists), one PUT each, then ``index.json`` (the commit point), and only then delete the previous
    generation's objects, so a reader of ``url`` never sees a half-written index. Returns the uploaded info."""
    committed = read_info(local_dir)
    if is_set(committed):  # every member first (each with its own commit point), the set's index.json last
        for name in committed[MEMBERS_KEY]:
            publish(os.path.join(local_dir, name), storage.join(url, name))
        storage.upload(os.path.join(local_dir, INFO_FILE), storage.join(url, INFO_FILE))
        for name in storage.listdir(url):
            if (_MEMBER.match(name) and name not in committed[MEMBERS_KEY]) or _GENERATION.match(name):
                for entry in storage.listdir(storage.join(url, name)) if _MEMBER.match(name) else [None]:
                    storage.remove(storage.join(url, name, entry) if entry else storage.join(url, name))
        logger.info("uploaded a set of %d indexes to %s", len(committed[MEMBERS_KEY]), storage.public(url))
        return committed
    for name in committed["files"].values():
        storage.upload(os.path.join(local_dir, name), storage.join(url, name))
    storage.upload(os.path.join(local_dir, INFO_FILE), storage.join(url, INFO_FILE))  # the commit point
    keep = set(committed["files"].values())
    for name in storage.listdir(url):
        if (_GENERATION.match(name) or name in LEGACY_FILES.values()) and name not in keep:
            storage.remove(storage.join(url, name))
    logger.info("uploaded %s to %s", committed["files"].get("index"), storage.public(url))
    return committed


def fetch_index(url: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local copy of the index at ``url``, for loading: its current generation's files are downloaded into
    ``cache_dir`` (default ``$XDG_CACHE_HOME/manyview/index/<hash of the URL>``) unless already there (generation
    names are unique, so a cached file is the same file), ``index.json`` last. Returns the local directory."""
    info = read_info(url)
    if cache_dir is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        digest = hashlib.sha256(storage.public(url).encode("utf-8")).hexdigest()[:16]
        cache_dir = os.path.join(base, "manyview", "index", digest)
    local = Path(cache_dir)
    local.mkdir(parents=True, exist_ok=True)
    if is_set(info):
        for name in info[MEMBERS_KEY]:
            fetch_index(storage.join(url, name), local / name)
        _write_json(local / INFO_FILE, info)
        remove_stale(local, info)
        return local
    names = dict(LEGACY_FILES)
    names.update(info.get("files") or {})
    for name in names.values():
        if not (local / name).is_file():
            storage.download(storage.join(url, name), local / name)
    _write_json(local / INFO_FILE, info)
    remove_stale(local, info)
    return local


def local_copy(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """``path`` itself for a local index directory; for a URL, the directory of ``fetch_index`` (what loaders such
    as ``python -m app --index s3://...`` open)."""
    text = os.fspath(path)
    return str(fetch_index(text, cache_dir)) if storage.is_url(text) else text


def remove_stale(directory: str | os.PathLike, info: dict) -> None:
    """Delete generation files, legacy files and set members that ``info`` does not name."""
    import shutil

    output = Path(directory)
    keep = set((info.get("files") or {}).values()) | set(info.get(MEMBERS_KEY) or [])
    for entry in output.iterdir():
        if _MEMBER.match(entry.name) and entry.name not in keep:  # a previous set's member
            shutil.rmtree(entry, ignore_errors=True)
            continue
        stale_generation = _GENERATION.match(entry.name) is not None
        stale_legacy = entry.name in LEGACY_FILES.values()
        stale_temporary = entry.name.startswith(f".{INFO_FILE}.tmp-")
        if (stale_generation or stale_legacy or stale_temporary) and entry.name not in keep:
            entry.unlink(missing_ok=True)


def read_faiss(path: Path, mmap: bool = False, family: str | None = None, on_disk: bool = False) -> Any:
    """``faiss.read_index`` with clear errors; on-disk lists are looked up next to the index file.

    ``mmap`` maps the data instead of reading it (for indexes larger than RAM): IVF inverted lists
    (``IO_FLAG_MMAP``, for ``family`` "ivf"/"ivfpq") or flat vector storage (``IO_FLAG_MMAP_IFC``). An index
    whose lists are ``on_disk`` (``index.merge --on-disk``) is mapped already: ``IO_FLAG_MMAP`` on it would
    make faiss crash on the first search, so it is not set.
    """
    import faiss

    if not path.is_file():
        raise FileNotFoundError(f"index file {str(path)!r} does not exist")
    flags = faiss.IO_FLAG_ONDISK_SAME_DIR
    if mmap and not on_disk:
        flags |= faiss.IO_FLAG_MMAP if family in ("ivf", "ivfpq") else faiss.IO_FLAG_MMAP_IFC
    try:
        return faiss.read_index(str(path), flags)
    except Exception as error:  # faiss raises RuntimeError with a C++ message for truncated/corrupt files
        raise IndexLoadError(f"cannot read FAISS index {str(path)!r} (corrupt or not a FAISS file): {error}") from error


def read_metadata(path: Path) -> Any:
    """The metadata ``pyarrow.Table`` (memory-mapped), checked for the required columns."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise FileNotFoundError(f"index file {str(path)!r} does not exist")
    try:
        table = pq.read_table(str(path), memory_map=True)
    except Exception as error:  # pyarrow raises ArrowInvalid and friends for damaged files
        raise IndexLoadError(f"cannot read metadata {str(path)!r}: {error}") from error
    missing = set(METADATA_COLUMNS) - set(table.column_names)
    if missing:
        raise IndexLoadError(f"{path} lacks the column(s) {sorted(missing)}")
    return table


# -- what an index holds ----------------------------------------------------------------------------


def _ivf(index: Any) -> Any:
    import faiss

    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def shard_members(index: Any) -> list[Any] | None:
    """The member indexes of a ``faiss.IndexShards`` (how a loaded set searches), else None."""
    import faiss

    outer = faiss.downcast_index(index)
    if not isinstance(outer, faiss.IndexShards):
        return None
    return [outer.at(number) for number in range(outer.count())]


def stored_ids(index: Any) -> np.ndarray | None:
    """Every id in ``index`` (IDMap's table or the inverted lists), or None when ids are positions."""
    import faiss

    members = shard_members(index)
    if members is not None:
        found = [stored_ids(member) for member in members]
        return None if any(ids is None for ids in found) else np.concatenate(found)
    outer = faiss.downcast_index(index)
    if hasattr(outer, "id_map"):
        return faiss.vector_to_array(outer.id_map).astype(np.int64)
    ivf = _ivf(index)
    if ivf is None:
        return None
    lists = ivf.invlists
    found = []
    for number in range(ivf.nlist):
        size = lists.list_size(number)
        if size:
            pointer = lists.get_ids(number)
            found.append(faiss.rev_swig_ptr(pointer, size).copy())
            lists.release_ids(number, pointer)
    return np.concatenate(found).astype(np.int64) if found else np.zeros(0, dtype=np.int64)


def stored_vectors(index: Any, chunk: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]] | None:
    """``(float32 [n, D], ids [n])`` blocks of the exact stored vectors, for indexes that keep them
    (Flat, HNSW over Flat storage, IVF-Flat, any index with exact re-ranking ``,RFlat``, whose refine stage
    holds them in id-map order); None for compressed ones (PQ), whose exact vectors
    must come from the embeddings they were built from."""
    import itertools

    import faiss

    members = shard_members(index)
    if members is not None:  # a set: each member's blocks in turn
        blocks = [stored_vectors(member, chunk) for member in members]
        return None if any(block is None for block in blocks) else itertools.chain.from_iterable(blocks)
    outer = faiss.downcast_index(index)
    if hasattr(outer, "id_map"):
        inner = faiss.downcast_index(outer.index)
        if isinstance(inner, faiss.IndexRefine):  # ",RFlat": the re-ranking stage keeps the exact vectors
            inner = faiss.downcast_index(inner.refine_index)
        if not isinstance(inner, (faiss.IndexFlat, faiss.IndexHNSWFlat)):
            return None
        ids = faiss.vector_to_array(outer.id_map).astype(np.int64)

        def from_id_map() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for start in range(0, len(ids), chunk):
                stop = min(len(ids), start + chunk)
                yield inner.reconstruct_n(start, stop - start), ids[start:stop]

        return from_id_map()
    if isinstance(outer, faiss.IndexIVFFlat):

        def from_lists() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            lists = outer.invlists
            for number in range(outer.nlist):
                size = lists.list_size(number)
                if not size:
                    continue
                codes = faiss.rev_swig_ptr(lists.get_codes(number), size * lists.code_size).copy()
                ids = faiss.rev_swig_ptr(lists.get_ids(number), size).copy()
                yield codes.view(np.float32).reshape(size, outer.d), ids.astype(np.int64)

        return from_lists()
    return None
