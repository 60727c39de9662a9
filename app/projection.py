"""The map's data: every indexed point (up to ``MAP_LIMIT``) projected to 2-D, clustered, and cached on disk.

    layout = map_layout(index, "PCA")             # MapLayout: rows, ids, xy, quantised coordinates
    labels = cluster_labels(index, layout, 10)    # k-means cluster of every point (faiss.Kmeans)

Vectors are streamed from the FAISS index in blocks (``index.store.stored_vectors`` for Flat, HNSW and
IVF-Flat; decoded with a direct map for compressed indexes such as IVF-PQ), so a million 512-d
vectors never sit in memory at once:

* PCA: one pass accumulates the mean and the D x D scatter matrix (float64), a second projects.
* UMAP (only when ``umap-learn`` is importable): fitted on at most ``UMAP_LANDMARKS`` random points;
  every other point is placed at the similarity-weighted mean of its nearest landmarks (faiss kNN),
  which keeps a million points to seconds instead of the hour UMAP itself would take.
* k-means: ``faiss.Kmeans`` trained on at most 256 points per centroid, then every point assigned.

Each result is written once, atomically (temporary file + ``os.replace``), to ``RUN/index/map/`` with
the index's fingerprint (``index_fingerprint``: the generation file names that ``index.json`` names,
their sizes and mtimes, count and dim); a later start with the same index reads it back, a changed
index (add, remove, rebuild) recomputes it. An index directory that cannot be written is no error:
the results are then kept in memory only. No torch, no gradio.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

logger = logging.getLogger(__name__)

MAP_LIMIT = 1_000_000
CACHE_DIR = "map"
CACHE_VERSION = 1
QUANT = 65535  # coordinates sent to the browser as uint16 in [0, QUANT]
UMAP_LANDMARKS = 20_000
LANDMARK_NEIGHBOURS = 8
BLOCK = 65536

Blocks = Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]  # a fresh iterator of (positions, vectors)


class MapDataError(ValueError):
    """The map cannot be computed from this index (say why and what to do)."""


@dataclass
class MapLayout:
    """The points on the map: metadata ``rows`` (sorted), their ``ids``, 2-D ``xy`` and the uint16 ``quantised``
    coordinates the browser draws (one scale for both axes, so the picture keeps its aspect)."""

    projection: str
    rows: np.ndarray
    ids: np.ndarray
    xy: np.ndarray
    quantised: np.ndarray
    fingerprint: str

    @property
    def count(self) -> int:
        return int(len(self.rows))

    def positions_of(self, ids: Any) -> np.ndarray:
        """Map positions of sample ``ids`` (ids not on the map are left out)."""
        wanted = np.asarray(ids, dtype=np.int64).ravel()
        order = np.argsort(self.ids, kind="stable")
        found = np.searchsorted(self.ids[order], wanted)
        found = np.minimum(found, len(order) - 1)
        hit = self.ids[order][found] == wanted if len(order) else np.zeros(len(wanted), bool)
        return order[found[hit]].astype(np.int64)


def umap_available() -> bool:
    return importlib.util.find_spec("umap") is not None


# -- identity and cache -------------------------------------------------------------------------------


def index_fingerprint(index: Any) -> str:
    """A short hash naming this exact index: ``index.json``'s generation file names (unique per commit),
    each data file's size and mtime (covers legacy directories without generations), count and dim."""
    from index.store import data_files

    directory = Path(index.directory)
    info = dict(getattr(index, "info", {}) or {})
    stats = {}
    for role, path in sorted(data_files(directory, info).items()):
        try:
            stat = path.stat()
            stats[role] = [path.name, stat.st_size, stat.st_mtime_ns]
        except OSError:
            stats[role] = [path.name, None, None]
    identity = {"files": stats, "members": info.get("members"), "count": int(index.count), "dim": int(index.dim),
                "updated": info.get("updated"),
                "created": info.get("created"), "version": CACHE_VERSION}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def cache_dir(index: Any) -> Path:
    return Path(index.directory) / CACHE_DIR


def load_cached(directory: Path, name: str, fingerprint: str, rows: np.ndarray) -> np.ndarray | None:
    """The cached array ``name`` when it was computed for this fingerprint and these rows, else None."""
    path = directory / f"{name}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["fingerprint"]) != fingerprint or not np.array_equal(stored["rows"], rows):
                return None
            return np.array(stored["data"])
    except (OSError, ValueError, KeyError) as error:  # a damaged file is recomputed
        logger.warning("ignoring the map cache %s: %s", path, error)
        return None


def save_cached(directory: Path, name: str, fingerprint: str, rows: np.ndarray, data: np.ndarray) -> bool:
    """Write ``name`` atomically (a reader never sees half a file); False when the directory is read-only."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile(dir=directory, prefix=f".{name}.", suffix=".tmp", delete=False)
    except OSError as error:
        logger.warning("the map cache cannot be written to %s (%s); it is kept in memory only", directory, error)
        return False
    try:
        with handle:
            np.savez(handle, fingerprint=np.array(fingerprint), rows=rows, data=data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, directory / f"{name}.npz")
        return True
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def cached(index: Any, name: str, rows: np.ndarray, make: Callable[[], np.ndarray]) -> np.ndarray:
    """``make()`` unless ``RUN/index/map/<name>.npz`` holds it for this index and rows; then saved there."""
    fingerprint = index_fingerprint(index)
    directory = cache_dir(index)
    found = load_cached(directory, name, fingerprint, rows)
    if found is not None:
        return found
    data = make()
    save_cached(directory, name, fingerprint, rows, data)
    return data


# -- which points, and their vectors -------------------------------------------------------------------


def map_rows(count: int, limit: int = MAP_LIMIT, seed: int = 0) -> np.ndarray:
    """Metadata rows drawn on the map: all of them up to ``limit``, else a fixed random ``limit`` (sorted)."""
    if limit < 1:
        raise MapDataError(f"the map limit must be at least 1, got {limit}")
    if count <= limit:
        return np.arange(count, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(count, size=limit, replace=False)).astype(np.int64)


def _reconstructed(faiss_index: Any, ids: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]] | None:
    """Blocks of vectors decoded by id (compressed IVF indexes, through a hash-table direct map on a copy)."""
    import faiss

    try:
        clone = faiss.clone_index(faiss_index)
        try:
            faiss.extract_index_ivf(clone).set_direct_map_type(faiss.DirectMap.Hashtable)
        except RuntimeError:
            pass  # not an IVF index: reconstruct_batch works (or fails) as it is
        clone.reconstruct_batch(ids[:1])
    except (RuntimeError, AttributeError, TypeError):
        return None

    def blocks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(ids), BLOCK):
            chunk = ids[start:start + BLOCK]
            yield np.asarray(clone.reconstruct_batch(chunk), np.float32), chunk

    return blocks()


def vector_blocks(index: Any, rows: np.ndarray) -> Blocks:
    """A function returning a fresh iterator of ``(positions, float32 vectors)`` over the map's points
    (``positions`` index ``rows``). ``MapDataError`` when the index keeps no vectors that can be read back."""
    from index.store import stored_vectors

    ids = np.asarray(index.ids, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    wanted = np.zeros(len(ids), dtype=bool)
    wanted[rows] = True
    position_of_row = np.full(len(ids), -1, dtype=np.int64)
    position_of_row[rows] = np.arange(len(rows))

    def to_positions(block_ids: np.ndarray) -> np.ndarray:
        found = order[np.minimum(np.searchsorted(sorted_ids, block_ids), len(order) - 1)]
        return position_of_row[found]

    if stored_vectors(index.faiss_index, 1) is not None:
        def exact() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for vectors, block_ids in stored_vectors(index.faiss_index, BLOCK):
                positions = to_positions(block_ids)
                keep = positions >= 0
                if keep.any():
                    yield positions[keep], np.asarray(vectors, np.float32)[keep]
        return exact
    if _reconstructed(index.faiss_index, ids[rows[:1]]) is None:
        raise MapDataError(f"the index {index.directory} ({index.info.get('factory', '?')}) keeps no vectors that can "
                           "be read back for the map; rebuild it with a Flat, HNSW, IVF-Flat or IVF-PQ factory")

    def decoded() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for vectors, block_ids in _reconstructed(index.faiss_index, ids[rows]) or iter(()):
            yield to_positions(block_ids), vectors
    return decoded


# -- projections -------------------------------------------------------------------------------------


def pca_axes(blocks: Blocks, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], axes [2, D]) of the first two principal components, from one streamed pass.
    Each axis's sign makes its largest loading positive, so the picture is reproducible."""
    count, total, scatter = 0, np.zeros(dim), np.zeros((dim, dim))
    for _, vectors in blocks():
        x = np.asarray(vectors, np.float64)
        count += len(x)
        total += x.sum(axis=0)
        scatter += x.T @ x
    if count == 0:
        raise MapDataError("the index holds no vectors to draw")
    mean = total / count
    covariance = scatter / count - np.outer(mean, mean)
    values, vectors = np.linalg.eigh(covariance)
    axes = vectors[:, np.argsort(values)[::-1][:2]].T
    if len(axes) < 2:  # 1-d embeddings
        axes = np.vstack([axes, np.zeros((2 - len(axes), dim))])
    signs = np.sign(axes[np.arange(2), np.argmax(np.abs(axes), axis=1)])
    return mean, axes * np.where(signs == 0, 1.0, signs)[:, None]


def project(blocks: Blocks, count: int, transform: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """float32 [count, 2]: ``transform`` applied to every block, placed by position."""
    xy = np.zeros((count, 2), dtype=np.float32)
    for positions, vectors in blocks():
        xy[positions] = transform(vectors)
    return xy


def pca_layout(blocks: Blocks, count: int, dim: int) -> np.ndarray:
    mean, axes = pca_axes(blocks, dim)
    return project(blocks, count, lambda x: (np.asarray(x, np.float64) - mean) @ axes.T)


def gather(blocks: Blocks, positions: np.ndarray, dim: int) -> np.ndarray:
    """The vectors at ``positions`` (sorted), from one streamed pass."""
    found = np.zeros((len(positions), dim), dtype=np.float32)
    for block_positions, vectors in blocks():
        at = np.searchsorted(positions, block_positions)
        at = np.minimum(at, max(len(positions) - 1, 0))
        hit = positions[at] == block_positions if len(positions) else np.zeros(len(at), bool)
        found[at[hit]] = vectors[hit]
    return found


def landmark_layout(blocks: Blocks, count: int, dim: int, fit: Callable[[np.ndarray], np.ndarray],
                    landmarks: int = UMAP_LANDMARKS, neighbours: int = LANDMARK_NEIGHBOURS,
                    seed: int = 0) -> np.ndarray:
    """``fit`` (e.g. UMAP) on at most ``landmarks`` random points; every point is then placed at the
    similarity-weighted mean of its ``neighbours`` nearest landmarks (a landmark lands on itself)."""
    import faiss

    chosen = np.sort(np.random.default_rng(seed).choice(count, size=min(count, landmarks), replace=False))
    anchors = gather(blocks, chosen, dim)
    anchor_xy = np.asarray(fit(anchors), np.float32)
    search = faiss.IndexFlatL2(dim)
    search.add(anchors)
    k = min(neighbours, len(chosen))

    def place(vectors: np.ndarray) -> np.ndarray:
        distances, nearest = search.search(np.ascontiguousarray(vectors, np.float32), k)
        weights = 1.0 / (np.maximum(distances, 0.0) + 1e-6)
        exact = distances[:, :1] <= 1e-10
        weights = np.where(exact, np.where(np.arange(k)[None] == 0, 1.0, 0.0), weights)
        weights /= weights.sum(axis=1, keepdims=True)
        return (anchor_xy[nearest] * weights[..., None]).sum(axis=1)

    return project(blocks, count, place)


def umap_fit(vectors: np.ndarray, seed: int = 0) -> np.ndarray:
    import umap  # optional dependency

    reducer = umap.UMAP(n_components=2, metric="cosine", random_state=seed, n_neighbors=min(15, len(vectors) - 1))
    return np.asarray(reducer.fit_transform(vectors), dtype=np.float32)


def quantise(xy: np.ndarray) -> np.ndarray:
    """uint16 [N, 2] in ``[0, QUANT]``: one scale for both axes (the larger span fills the range)."""
    xy = np.asarray(xy, np.float64)
    if not len(xy):
        return np.zeros((0, 2), np.uint16)
    low = xy.min(axis=0)
    span = float((xy.max(axis=0) - low).max()) or 1.0
    return np.rint((xy - low) / span * QUANT).astype(np.uint16)


def map_layout(index: Any, projection: str = "PCA", limit: int = MAP_LIMIT, seed: int = 0) -> MapLayout:
    """Every indexed point (up to ``limit``) in 2-D, read from the cache beside the index or computed and saved."""
    name = projection.upper()
    if name not in ("PCA", "UMAP"):
        raise MapDataError(f"unknown projection {projection!r}; use PCA or UMAP")
    if name == "UMAP" and not umap_available():
        raise MapDataError("UMAP needs the umap-learn package (pip install umap-learn); PCA is always available")
    rows = map_rows(index.count, limit, seed)
    if not len(rows):
        raise MapDataError("the index holds no vectors to draw")
    blocks = vector_blocks(index, rows)
    if name == "PCA":
        xy = cached(index, f"pca-{limit}-{seed}", rows, lambda: pca_layout(blocks, len(rows), index.dim))
    else:
        xy = cached(index, f"umap-{limit}-{seed}", rows,
                    lambda: landmark_layout(blocks, len(rows), index.dim, lambda x: umap_fit(x, seed), seed=seed))
    ids = np.asarray(index.ids, dtype=np.int64)[rows]
    return MapLayout(name, rows, ids, xy, quantise(xy), index_fingerprint(index))


def kmeans_labels(blocks: Blocks, count: int, dim: int, k: int, seed: int = 0, iterations: int = 20) -> np.ndarray:
    """int32 [count] cluster of every point: ``faiss.Kmeans`` (best of 3 starts) trained on at most 256 points
    per centroid (a random subset, as faiss itself would subsample), then each point assigned to its nearest
    centroid in one streamed pass."""
    import faiss

    k = max(1, min(int(k), count))
    train = np.sort(np.random.default_rng(seed).choice(count, size=min(count, 256 * k), replace=False))
    model = faiss.Kmeans(dim, k, niter=iterations, nredo=3, seed=seed, max_points_per_centroid=256, verbose=False)
    model.train(gather(blocks, train, dim))
    labels = np.zeros(count, dtype=np.int32)
    for positions, vectors in blocks():
        _, nearest = model.index.search(np.ascontiguousarray(vectors, np.float32), 1)
        labels[positions] = nearest[:, 0]
    return labels


def cluster_labels(index: Any, layout: MapLayout, k: int, seed: int = 0) -> np.ndarray:
    """k-means clusters of the layout's points, cached beside the index like the projection."""
    if int(k) < 1:
        raise MapDataError(f"the number of clusters must be at least 1, got {k}")
    blocks = vector_blocks(index, layout.rows)
    return cached(index, f"kmeans-{int(k)}-{layout.count}-{seed}", layout.rows,
                  lambda: kmeans_labels(blocks, layout.count, index.dim, int(k), seed))
