"""Dataset curation from an index's own embeddings: what FiftyOne Brain computes, with faiss kNN search.

    python -m index.curate --index RUN/index [--output DIR] [--verify auto|thumbnail|none] [--k 10] [--cpu]

Reads the index directory written by ``index.build`` (its vectors come back from the FAISS index when
it stores them: Flat, HNSW, IVF-Flat; from the embeddings it was built from, or by re-encoding the
shard images, when it does not) and writes, atomically (each file to a temporary name, then
``os.replace``; ``curation.json`` last), into ``--output`` (default ``RUN/index/curation/``):

    near_duplicates.parquet   one row per member of a near-duplicate group: group, id, key, shard, split,
                              score (embedding cosine similarity to its best match), pixel_score (thumbnail
                              similarity to it; NaN with --verify none), match_id (that member: the highest
                              pixel_score, or cosine without verification), keep (one member per group is kept:
                              the one from the evaluation split, else the first in index order)
    exact_duplicates.parquet  one row per member of a group of byte-identical images (content hash of the
                              encoded image read from its shard): group, id, key, shard, split, hash, keep
    leaks.parquet             one row per item with a near-duplicate in another split (train/val/test, from
                              the shards' manifest or names): group, id, key, shard, split, score, pixel_score,
                              match_id, match_split, drop (true for the copy in the lower split: train before val
                              before test)
    scores.parquet            one row per item: uniqueness, representativeness, cluster, outlier_score,
                              outlier, mistakenness, predicted_label, likely_mistake, nn_id, nn_score,
                              duplicate_group, exact_group
    label_mistakes.parquet    the items whose neighbours mostly carry another label, worst first
    outliers.parquet          the items far from everything, most isolated first
    curation.json             parameters, counts, timings and the index generation they were computed from

Everything comes from one kNN search of every stored vector against the index (its tuned ANN search,
so the cost grows with the collection, n x k, never with all pairs), widened only for the rows whose
k-th neighbour is still a near-duplicate, plus one k-means for representativeness. Scores:

* near-duplicate (``verify`` thumbnail, the default when the shards can be read): a candidate pair among
  each item's ``candidates`` (32) nearest neighbours above ``candidate_threshold`` (0.8) whose pixel
  thumbnails agree (cosine >= ``verify_threshold``). A short-trained encoder puts distinct images as close
  as copies (tests/benchmarks/RESULTS_curate.md), so the embedding only proposes and the pixels decide.
  The thumbnail (``thumbnail_vectors``) is the image at 32x32 averaged down to 8x8 per channel, with
  each channel's mean and spread removed: JPEG re-encoding, colour shifts and contrast changes barely move
  it. A crop of a pixel or two scaled back does (down to 0.6 measured), so pairs between ``ALIGN_GATE``
  and the threshold get the aligned check (``aligned_scores``): the best thumbnail cosine under any crop
  of 0-2 px a side of either image, from a 16x16 copy kept beside the thumbnails. Both are made in the
  same pass over the shards as the content hashes. ``verify`` none: cosine similarity >= ``threshold``.
  Groups are the connected components of the accepted pairs;
* uniqueness: weighted cosine distance to the 3 nearest other items (weights 0.6, 0.3, 0.1, as FiftyOne
  Brain does), divided by its largest value over the collection: 1 = the most isolated item, 0 = an item
  with identical copies;
* representativeness: cosine similarity to the centre of its k-means cluster divided by the largest one
  in that cluster (1 = the most central item of its cluster);
* outlier_score: mean cosine distance to the k nearest other items; ``outlier`` when its modified z-score
  (Iglewicz and Hoaglin: 0.6745 (x - median) / MAD) exceeds ``outlier_z`` (3.5);
* mistakenness: the share of the similarity-weighted votes of the k nearest labelled neighbours that
  disagree with an item's label; ``likely_mistake`` when a single other label wins at least
  ``mistake_share`` (0.7) of the votes.

No torch is imported.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import io
import json
import logging
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from trainer.data import storage

logger = logging.getLogger(__name__)

OUTPUT_DIRNAME = "curation"
SUMMARY_FILE = "curation.json"
TABLE_NAMES = ("near_duplicates", "exact_duplicates", "leaks", "scores", "label_mistakes", "outliers")
# Measured on CIFAR-10 with planted copies (tests/benchmarks/RESULTS_curate.md): see DEFAULT_THRESHOLD's note there.
DEFAULT_THRESHOLD = 0.95
DEFAULT_K = 10
DEFAULT_OUTLIER_Z = 3.5
DEFAULT_MISTAKE_SHARE = 0.7
MAX_K = 1024  # the widest neighbour list asked for a saturated row (a group larger than this is cut there)
MAX_CLUSTERS = 256
QUERY_BATCH = 8192
UNIQUENESS_WEIGHTS = (0.6, 0.3, 0.1)
VERIFY_MODES = ("auto", "thumbnail", "none")
# Pixel verification, measured on CIFAR-10 with planted copies (tests/benchmarks/RESULTS_curate.md).
DEFAULT_CANDIDATES = 32  # embedding neighbours per item proposed to verification
DEFAULT_CANDIDATE_THRESHOLD = 0.8  # loose: the copies' cosine goes down to 0.87 with a 300-step simclr encoder
DEFAULT_VERIFY_THRESHOLD = 0.98  # recall and precision >= 0.95 on CIFAR-10 with hand-labelled duplicates
THUMB_SIZE = 32  # every image is first brought to this square size (CIFAR's own)
THUMB_GRID = 8  # then averaged down to grid x grid per channel: 192 numbers
THUMB_BLUR = 0.0  # Gaussian radius (pixels at THUMB_SIZE) before averaging: 1 px measured no better (RESULTS_curate.md)
THUMB_MEMORY_BYTES = 1 << 30  # thumbnails larger than this go to a temporary file (np.memmap)
IMAGE_BATCH = 4096
ALIGN_SIZE = 16  # the aligned check resamples a 16x16 copy of each image (kept beside the thumbnails)
ALIGN_CROPS = (0, 1, 2)  # ... under every crop of these pixels (of 32) off each end, scaled back: 81 warps
ALIGN_GATE = 0.8  # pairs whose plain thumbnail similarity is below this are not aligned (most candidates)
SPLIT_PRIORITY = {"test": 3, "val": 2, "train": 1}
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "dev": "val", "test": "test", "testing": "test", "eval": "test", "evaluation": "test"}
_SPLIT_NAME = re.compile(r"^(training|train|validation|valid|val|dev|testing|test|evaluation|eval)(?=$|[-_.0-9])",
                         re.IGNORECASE)


class CurationError(ValueError):
    """Bad input to curation (a missing index directory, an out-of-range option); the message says what to do."""


@dataclass
class Params:
    """What curation computes with; recorded in ``curation.json``."""

    threshold: float = DEFAULT_THRESHOLD
    leak_threshold: float | None = None  # None: the near-duplicate threshold
    k: int = DEFAULT_K
    clusters: int | None = None  # None: round(sqrt(n)), at most MAX_CLUSTERS
    outlier_z: float = DEFAULT_OUTLIER_Z
    mistake_share: float = DEFAULT_MISTAKE_SHARE
    hashes: bool = True
    seed: int = 0
    verify: str = "auto"  # auto: thumbnail when every shard can be read, else none
    candidates: int = DEFAULT_CANDIDATES
    candidate_threshold: float = DEFAULT_CANDIDATE_THRESHOLD
    verify_threshold: float = DEFAULT_VERIFY_THRESHOLD

    def check(self) -> None:
        """Raise ``CurationError`` for values outside their range."""
        for name in ("threshold", "leak_threshold", "candidate_threshold", "verify_threshold"):
            value = getattr(self, name)
            if value is not None and not -1.0 <= value <= 1.0:
                raise CurationError(f"--{name.replace('_', '-')} {value} is not a cosine similarity; give a value "
                                    "in [-1, 1] (near-duplicates are typically above 0.9)")
        if not 1 <= self.k <= MAX_K:
            raise CurationError(f"--k {self.k} must be between 1 and {MAX_K}")
        if not 1 <= self.candidates <= MAX_K:
            raise CurationError(f"--candidates {self.candidates} must be between 1 and {MAX_K}")
        if self.verify not in VERIFY_MODES:
            raise CurationError(f"--verify {self.verify!r} is not one of {', '.join(VERIFY_MODES)}")
        if self.clusters is not None and self.clusters < 1:
            raise CurationError(f"--clusters {self.clusters} must be at least 1")
        if not 0.0 < self.mistake_share <= 1.0:
            raise CurationError(f"--mistake-share {self.mistake_share} must be in (0, 1]")
        if self.outlier_z <= 0:
            raise CurationError(f"--outlier-z {self.outlier_z} must be positive")

    def edge_threshold(self, verified: bool = False) -> float:
        """The lowest embedding similarity any table needs: pairs above it are collected (with pixel
        verification, the looser candidate threshold: the thumbnails decide)."""
        if verified:
            return self.candidate_threshold
        return min(self.threshold, self.threshold if self.leak_threshold is None else self.leak_threshold)


@dataclass
class Neighbourhood:
    """Every item's k nearest other items (rows of the metadata, -1 padded) and the near-duplicate pairs."""

    rows: np.ndarray  # int64 [n, k]
    scores: np.ndarray  # float32 [n, k], -inf where padded
    pairs: np.ndarray  # int64 [m, 2] metadata rows, a < b, each pair once
    pair_scores: np.ndarray  # float32 [m]
    widened: int = 0  # rows searched again with a larger k
    seconds: float = 0.0
    pair_verify: np.ndarray | None = None  # float32 [m] thumbnail similarity of each pair (with verification)
    examined: int = 0  # candidate pairs (both directions) above the embedding threshold
    rejected: int = 0  # of those, the ones the thumbnails rejected


@dataclass
class Verifier:
    """Pixel verification of candidate pairs: the cosine of their thumbnails (rows of ``thumbs``) and,
    when ``small`` images are given, for pairs at or above ``gate``, the best cosine of one image's
    thumbnail with the other's under any crop of up to ``ALIGN_CROPS`` pixels a side (either way
    round): a 1-2 px crop scaled back moves an 8x8 thumbnail a quarter to half a cell, enough to drop its
    plain cosine to 0.6 on textured images, while the aligned one stays near 1."""

    thumbs: np.ndarray  # float32 [n, d], unit rows (zero for a flat image: it verifies with nothing)
    threshold: float
    small: np.ndarray | None = None  # uint8 [n, ALIGN_SIZE, ALIGN_SIZE, 3]
    gate: float = ALIGN_GATE
    align_below: float | None = None  # pairs at or above this skip the aligned check (None: ``threshold``)
    aligned: int = 0  # pairs that went through the aligned check

    def scores(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Verification score of the pairs ``(a[i], b[i])``, in chunks (the arrays may be memmaps)."""
        out = np.empty(len(a), dtype=np.float32)
        for start in range(0, len(a), 65536):
            stop = start + 65536
            out[start:stop] = np.einsum("ij,ij->i", self.thumbs[a[start:stop]], self.thumbs[b[start:stop]])
        if self.small is not None:
            below = self.threshold if self.align_below is None else self.align_below
            todo = np.flatnonzero((out >= self.gate) & (out < below))
            # each pair once (a list holds both directions of most pairs)
            _, first, inverse = np.unique(np.stack([a[todo], b[todo]], axis=1), axis=0, return_index=True,
                                          return_inverse=True)
            unique = todo[first]
            best = np.empty(len(unique), dtype=np.float32)
            self.aligned += len(unique)
            for start in range(0, len(unique), 1024):
                rows = unique[start:start + 1024]
                forward = aligned_scores(self.small[a[rows]], self.thumbs[b[rows]])
                backward = aligned_scores(self.small[b[rows]], self.thumbs[a[rows]])
                best[start:start + 1024] = np.maximum(forward, backward)
            out[todo] = np.maximum(out[todo], best[inverse.reshape(-1)])
        return out


def crop_matrices(size: int = ALIGN_SIZE, grid: int = THUMB_GRID, crops: Sequence[int] = ALIGN_CROPS,
                  full: int = THUMB_SIZE) -> np.ndarray:
    """[len(crops)**2 * grid, size] averaging matrices: row block (first, last) maps a ``size``-pixel
    line to the ``grid`` cells that line would have after cropping ``first`` / ``last`` pixels (of
    ``full``) off its ends and scaling back (each cell: the mean of the source span it covers)."""
    blocks = []
    for first in crops:
        for last in crops:
            scale = (full - first - last) / full
            edges = (first + np.arange(grid + 1) * (full / grid) * scale) * (size / full)
            matrix = np.zeros((grid, size), dtype=np.float64)
            for cell in range(grid):
                low, high = edges[cell], edges[cell + 1]
                pixels = np.arange(size)
                matrix[cell] = np.clip(np.minimum(pixels + 1, high) - np.maximum(pixels, low), 0, None)
                matrix[cell] /= matrix[cell].sum()
            blocks.append(matrix)
    return np.concatenate(blocks).astype(np.float32)


_CROPS: dict[tuple, np.ndarray] = {}


def aligned_scores(small: np.ndarray, thumbs: np.ndarray) -> np.ndarray:
    """For each pair, the best cosine of ``thumbs[i]`` (unit, standardised 8x8 per channel) with the
    thumbnail of ``small[i]`` (uint8 [m, s, s, 3]) under every crop warp (``crop_matrices``, rows and
    columns independently). Two batched matrix products: [m*3, s, s] -> [m*3, W*8, W*8]."""
    key = (small.shape[1], THUMB_GRID, tuple(ALIGN_CROPS))
    if key not in _CROPS:
        _CROPS[key] = crop_matrices(small.shape[1], crops=ALIGN_CROPS)
    matrix = _CROPS[key]
    count, warps, grid = len(small), matrix.shape[0] // THUMB_GRID, THUMB_GRID
    images = small.astype(np.float32).transpose(0, 3, 1, 2)  # m, 3, s, s
    warped = (matrix @ images @ matrix.T).reshape(count, 3, warps, grid, warps, grid)  # every warp's 8x8
    # ``thumbs`` is standardised per channel (its channels sum to 0), so the warped thumbnail's mean drops
    # out of the dot product: cosine = sum over channels of (warped . thumb) / spread, over the norm.
    target = np.asarray(thumbs, dtype=np.float32).reshape(count, 3, 1, grid, 1, grid)
    dots = (warped * target).sum(axis=(3, 5))  # m, 3, W, W
    mean = warped.mean(axis=(3, 5))
    spread = np.sqrt(np.maximum((warped * warped).mean(axis=(3, 5)) - mean * mean, 0.0))
    textured = spread > 0.5
    scaled = np.divide(dots, spread, out=np.zeros_like(dots), where=textured).sum(axis=1)
    norm = np.sqrt(textured.sum(axis=1) * grid * grid)
    cosine = np.divide(scaled, norm, out=np.zeros_like(scaled), where=norm > 0)
    return cosine.reshape(count, -1).max(axis=1).astype(np.float32)


@dataclass
class Result:
    """The tables (``pyarrow.Table`` by name) and the summary written to ``curation.json``."""

    tables: dict[str, Any]
    summary: dict = field(default_factory=dict)


# -- splits -----------------------------------------------------------------------------------------


def split_of_shard(shard: str, manifests: dict[str, dict] | None = None) -> str:
    """``train`` / ``val`` / ``test`` for a shard path, else ``""``.

    The ``manifest.json`` beside the shard wins (``splits: {name: [{file: ...}]}``, as the prepare step
    writes it); otherwise the file name's first word (``train-000000.tar.gz``, ``val_3.tar``, ``test.tar``).
    ``manifests`` caches the parsed manifests by directory.
    """
    manifests = {} if manifests is None else manifests
    directory, name = os.path.split(shard)
    if directory not in manifests:
        manifests[directory] = _read_manifest(directory)
    for split, entries in (manifests[directory].get("splits") or {}).items():
        for entry in entries or []:
            listed = entry.get("file") if isinstance(entry, dict) else entry
            if listed is not None and os.path.basename(str(listed)) == name:
                return _SPLIT_ALIASES.get(str(split).lower(), str(split).lower())
    match = _SPLIT_NAME.match(name)
    return _SPLIT_ALIASES[match.group(1).lower()] if match else ""


def _read_manifest(directory: str) -> dict:
    path = os.path.join(directory, "manifest.json")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def split_column(shards: Sequence[str]) -> list[str]:
    """The split of every row, computed once per distinct shard."""
    manifests: dict[str, dict] = {}
    known: dict[str, str] = {}
    out = []
    for shard in shards:
        if shard not in known:
            known[shard] = split_of_shard(shard, manifests)
        out.append(known[shard])
    return out


# -- vectors ----------------------------------------------------------------------------------------


def collection_vectors(index: Any, progress: bool = True) -> tuple[np.ndarray, str]:
    """Every indexed vector, in metadata row order, and where it came from.

    The FAISS index's own copy when it keeps exact vectors; else the embeddings directory it was built
    from (``index.json``'s ``embeddings``); else the shard images re-encoded with its encoder.
    """
    from index.store import stored_vectors

    vectors = np.zeros((index.count, index.dim), dtype=np.float32)
    filled = np.zeros(index.count, dtype=bool)
    blocks = stored_vectors(index.faiss_index)
    source = "index"
    if blocks is None and index.info.get("embeddings") and os.path.isdir(str(index.info["embeddings"])):
        from index.sources import EmbeddingsSource

        embedded = EmbeddingsSource(index.info["embeddings"]).blocks()
        blocks = ((block, table.column("id").to_numpy()) for block, table in embedded)
        source = "embeddings"
    if blocks is None:
        return _encode_rows(index, progress), "encoder"
    known = set(np.asarray(index.ids).tolist()) if source == "embeddings" else None
    for block, ids in _progress(blocks, progress, "reading vectors", unit="block"):
        ids = np.asarray(ids, dtype=np.int64)
        if known is not None:  # the embeddings may hold items removed from the index since
            inside = np.fromiter((int(i) in known for i in ids), dtype=bool, count=len(ids))
            block, ids = block[inside], ids[inside]
        rows = index.rows(ids)
        vectors[rows] = block
        filled[rows] = True
    if not filled.all():
        raise CurationError(f"{int((~filled).sum())} indexed item(s) have no vector in the {source}; rebuild the index")
    return vectors, source


def _encode_rows(index: Any, progress: bool) -> np.ndarray:
    """Re-encode every item's image (read from its shard) with the encoder ``index.json`` names."""
    from export.runtime import Encoder
    from trainer.data.shards import decode_image

    encoder_dir = index.info.get("encoder")
    if not encoder_dir or not os.path.isdir(str(encoder_dir)):
        raise CurationError("this index does not store its vectors (a compressed index) and neither its embeddings "
                            f"nor its encoder directory ({encoder_dir!r}) can be found; rebuild it or use a Flat/HNSW "
                            "index")
    encoder = Encoder(encoder_dir)
    mode = "L" if encoder.preprocess.channels == 1 else "RGB"
    vectors = np.zeros((index.count, index.dim), dtype=np.float32)
    pending_rows: list[int] = []
    pending_images: list[Any] = []
    for row, data in _progress(iter_image_bytes(index.metadata), progress, "encoding", total=index.count, unit="img"):
        pending_rows.append(row)
        pending_images.append(decode_image(data, mode=mode))
        if len(pending_images) == 256:
            vectors[pending_rows] = encoder.encode_images(pending_images)
            pending_rows, pending_images = [], []
    if pending_images:
        vectors[pending_rows] = encoder.encode_images(pending_images)
    return vectors


def iter_image_bytes(metadata: Any) -> Iterable[tuple[int, bytes]]:
    """``(metadata row, encoded image bytes)`` for every row, each shard read once, in shard order.

    Raises ``CurationError`` for a shard that is gone or a key it does not hold.
    """
    from trainer.data.shards import iter_shard

    shards = metadata.column("shard").to_pylist()
    keys = metadata.column("key").to_pylist()
    by_shard: dict[str, dict[str, int]] = {}
    for row, (shard, key) in enumerate(zip(shards, keys)):
        by_shard.setdefault(str(shard), {})[str(key)] = row
    for shard, wanted in by_shard.items():
        if not shard or not storage.exists(shard):
            raise CurationError(f"shard {shard!r} named in the index metadata does not exist; exact duplicates "
                                "are found and near-duplicates verified by reading the images from their shards "
                                "(or pass --no-hash --verify none)")
        found = 0
        for sample in iter_shard(shard):
            row = wanted.get(sample.key)
            if row is not None and sample.image is not None:
                found += 1
                yield row, sample.image
        if found != len(wanted):
            raise CurationError(f"shard {shard!r} lacks {len(wanted) - found} of the {len(wanted)} images the index "
                                "metadata names in it; was it rewritten after the index was built?")


def _progress(iterable: Iterable, enabled: bool, desc: str, total: int | None = None, unit: str = "it") -> Iterable:
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=not enabled, file=sys.stderr)


# -- neighbours -------------------------------------------------------------------------------------


def search_params(index: Any, k: int) -> dict:
    """The index's tuned parameters, with HNSW's efSearch raised to at least 2(k+1) (and 64): the
    build tuned it for 10 neighbours of a new query; curation wants every near neighbour."""
    params = dict(index.info.get("search_params") or {})
    if "efSearch" in params or index.info.get("family") == "hnsw":
        params["efSearch"] = max(int(params.get("efSearch", 0)), 2 * (k + 1), 64)
    return params


def neighbourhood(index: Any, vectors: np.ndarray, k: int, edge_threshold: float, progress: bool = True,
                  batch: int = QUERY_BATCH, max_k: int = MAX_K, verifier: Verifier | None = None,
                  candidates: int = 0) -> Neighbourhood:
    """Search every vector against the index for its ``max(k, candidates)`` nearest other items; collect
    the pairs at or above ``edge_threshold`` (and, with a ``verifier``, whose thumbnails agree). Rows whose
    every neighbour was collected (a group larger than the list) are searched again with 4x the list
    until they are not (up to ``max_k``): the cost stays n x k, plus the rows of large groups. The
    returned ``rows``/``scores`` hold the first ``k`` neighbours (for the scores)."""
    started = time.perf_counter()
    n = len(vectors)
    if n < 2:  # a single item has no neighbours
        empty = np.zeros((0, 2), dtype=np.int64)
        return Neighbourhood(np.full((n, 1), -1, dtype=np.int64), np.full((n, 1), -np.inf, dtype=np.float32),
                             empty, np.zeros(0, dtype=np.float32), 0, time.perf_counter() - started,
                             np.zeros(0, dtype=np.float32) if verifier is not None else None)
    k = max(1, min(k, n - 1))
    search_k = max(1, min(max(k, candidates), n - 1))
    params = search_params(index, search_k)
    out_rows = np.full((n, k), -1, dtype=np.int64)
    out_scores = np.full((n, k), -np.inf, dtype=np.float32)
    found = _Pairs(edge_threshold, verifier)
    saturated: list[np.ndarray] = []
    starts = range(0, n, batch)
    for start in _progress(starts, progress, "kNN search", total=len(starts), unit="batch"):
        stop = min(n, start + batch)
        rows, scores = _search_others(index, vectors[start:stop], np.arange(start, stop), search_k + 1, params)
        out_rows[start:stop], out_scores[start:stop] = rows[:, :k], scores[:, :k]
        full = found.collect(np.arange(start, stop), rows[:, :search_k], scores[:, :search_k])
        saturated.append(np.arange(start, stop)[full])
    pending = np.concatenate(saturated) if saturated else np.zeros(0, dtype=np.int64)
    widened, wide = len(pending), search_k
    while len(pending) and wide < min(max_k, n - 1):
        wide = min(max_k, n - 1, wide * 4)
        rows, scores = _search_others(index, vectors[pending], pending, wide + 1, params)
        pending = pending[found.collect(pending, rows[:, :wide], scores[:, :wide])]
    if len(pending):
        logger.warning("%d item(s) have more than %d near-duplicates; their groups are cut at %d neighbours",
                       len(pending), wide, wide)
    pairs, pair_scores, pair_verify = found.unique()
    return Neighbourhood(out_rows, out_scores, pairs, pair_scores, widened, time.perf_counter() - started,
                         pair_verify, found.examined, found.rejected)


def _search_others(index: Any, queries: np.ndarray, query_rows: np.ndarray, k: int, params: dict
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, scores)`` [Q, k-1] of each query's neighbours without itself (metadata rows, -1 padded)."""
    scores, found = index.search(queries, k=k, params=params)
    rows = np.full(found.shape, -1, dtype=np.int64)
    valid = found >= 0
    if valid.any():
        rows[valid] = index.rows(found[valid])
    scores = np.where(valid, scores, -np.inf).astype(np.float32)
    own = rows == query_rows[:, None]
    # Drop the query itself (wherever it landed: an identical copy may rank first) and keep k-1 columns;
    # when the ANN search missed the query itself, the last column simply goes.
    rank = np.where(own, np.inf, np.arange(rows.shape[1])[None, :].astype(np.float64))
    order = np.argsort(rank, axis=1, kind="stable")[:, : rows.shape[1] - 1]
    rows, scores = np.take_along_axis(rows, order, axis=1), np.take_along_axis(scores, order, axis=1)
    return rows, scores


@dataclass
class _Pairs:
    """The pairs collected from neighbour lists: above the embedding threshold and, with a verifier,
    accepted by it."""

    threshold: float
    verifier: Verifier | None = None
    a: list = field(default_factory=list)
    b: list = field(default_factory=list)
    s: list = field(default_factory=list)
    v: list = field(default_factory=list)
    examined: int = 0
    rejected: int = 0

    def collect(self, query_rows: np.ndarray, rows: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Add the accepted pairs of these neighbour lists; return which lists were accepted throughout
        (their group may go on beyond the list)."""
        hit = (rows >= 0) & (scores >= self.threshold) & (rows != query_rows[:, None])
        if not hit.any():
            return np.zeros(len(rows), dtype=bool)
        a = np.broadcast_to(query_rows[:, None], rows.shape)[hit]
        b = rows[hit]
        low, high = np.minimum(a, b), np.maximum(a, b)
        self.examined += len(low)
        if self.verifier is not None:
            verify = self.verifier.scores(low, high)
            accepted = verify >= self.verifier.threshold
            self.rejected += int((~accepted).sum())
            hit[hit] = accepted
            low, high, self.v = low[accepted], high[accepted], self.v + [verify[accepted]]
            if not len(low):
                return np.zeros(len(rows), dtype=bool)
        self.a.append(low)
        self.b.append(high)
        self.s.append(scores[hit])
        return hit.all(axis=1)

    def unique(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Each unordered pair once, with its highest score (the two directions can differ by ANN noise),
        and its verification score (None without a verifier)."""
        verified = self.verifier is not None
        if not self.a:
            return (np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.float32),
                    np.zeros(0, dtype=np.float32) if verified else None)
        a, b, s = np.concatenate(self.a), np.concatenate(self.b), np.concatenate(self.s)
        v = np.concatenate(self.v) if verified else np.zeros(len(a), dtype=np.float32)
        order = np.lexsort((-s, b, a))
        a, b, s, v = a[order], b[order], s[order], v[order]
        first = np.ones(len(a), dtype=bool)
        first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
        return (np.stack([a[first], b[first]], axis=1), s[first].astype(np.float32),
                v[first].astype(np.float32) if verified else None)


def components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected-component label of each of ``n`` nodes: the smallest node of its component (isolated
    nodes are their own). Vectorised label propagation with pointer jumping: each round gives both ends
    of every pair the smaller of their labels, then follows labels to their roots; a few rounds suffice
    even for millions of pairs."""
    labels = np.arange(n, dtype=np.int64)
    if not len(pairs):
        return labels
    a, b = pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)
    while True:
        low = np.minimum(labels[a], labels[b])
        before = labels.copy()
        np.minimum.at(labels, a, low)
        np.minimum.at(labels, b, low)
        np.minimum.at(labels, before, labels)  # a root adopts what its members learnt
        while True:  # pointer jumping: every label to its root
            jumped = labels[labels]
            if np.array_equal(jumped, labels):
                break
            labels = jumped
        if np.array_equal(labels, before):
            return labels


def group_numbers(labels: np.ndarray) -> np.ndarray:
    """Groups of >= 2 members numbered 0, 1, ... (largest first, then by first member); -1 for singletons."""
    roots, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    groups = np.full(len(labels), -1, dtype=np.int64)
    multi = np.flatnonzero(counts >= 2)
    order = multi[np.lexsort((roots[multi], -counts[multi]))]
    number = np.full(len(roots), -1, dtype=np.int64)
    number[order] = np.arange(len(order))
    groups[:] = number[inverse]
    return groups


# -- scores -----------------------------------------------------------------------------------------


def uniqueness(scores: np.ndarray) -> np.ndarray:
    """FiftyOne Brain's uniqueness from each item's nearest-neighbour similarities ``scores`` [n, k] (sorted,
    -inf padded): the 0.6/0.3/0.1-weighted cosine distance to the 3 nearest, divided by the collection's
    largest. Items with fewer neighbours use the weights of those they have, renormalised."""
    take = min(len(UNIQUENESS_WEIGHTS), scores.shape[1])
    weights = np.asarray(UNIQUENESS_WEIGHTS[:take], dtype=np.float64)
    near = scores[:, :take].astype(np.float64)
    valid = np.isfinite(near)
    distance = np.where(valid, 1.0 - near, 0.0)
    weight = np.where(valid, weights[None, :], 0.0)
    total = weight.sum(axis=1)
    raw = np.divide((distance * weight).sum(axis=1), total, out=np.ones(len(scores)), where=total > 0)
    raw = np.clip(raw, 0.0, None)
    top = raw.max() if len(raw) else 0.0
    return (raw / top if top > 0 else np.zeros_like(raw)).astype(np.float32)


def kmeans(vectors: np.ndarray, clusters: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means (faiss): ``(cluster of each vector, cosine similarity to its centre)``."""
    import faiss

    clusters = max(1, min(int(clusters), len(vectors)))
    if clusters == 1:
        centre = vectors.mean(axis=0, keepdims=True)
        centre /= max(float(np.linalg.norm(centre)), 1e-12)
        return np.zeros(len(vectors), dtype=np.int64), (vectors @ centre[0]).astype(np.float32)
    model = faiss.Kmeans(vectors.shape[1], clusters, niter=20, seed=seed, spherical=True, verbose=False,
                         max_points_per_centroid=256, min_points_per_centroid=1)
    model.train(np.ascontiguousarray(vectors))
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(model.centroids)
    similarity, assigned = flat.search(np.ascontiguousarray(vectors), 1)
    return assigned[:, 0].astype(np.int64), similarity[:, 0].astype(np.float32)


def representativeness(cluster: np.ndarray, centrality: np.ndarray) -> np.ndarray:
    """Similarity to the cluster centre divided by the largest in the cluster, clipped to [0, 1]."""
    top = np.full(int(cluster.max()) + 1 if len(cluster) else 0, -np.inf)
    np.maximum.at(top, cluster, centrality)
    best = top[cluster]
    score = np.divide(centrality, best, out=np.ones(len(centrality)), where=best > 0)
    return np.clip(score, 0.0, 1.0).astype(np.float32)


def outlier_scores(scores: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(outlier_score, modified z-score, outlier flag)``: mean cosine distance to the k nearest others,
    flagged above ``z`` robust standard deviations (median and MAD, so the outliers do not hide themselves)."""
    valid = np.isfinite(scores)
    count = valid.sum(axis=1)
    summed = np.where(valid, 1.0 - scores, 0.0).sum(axis=1)
    distance = np.divide(summed, count, out=np.zeros(len(scores)), where=count > 0)
    median = float(np.median(distance)) if len(distance) else 0.0
    mad = float(np.median(np.abs(distance - median))) if len(distance) else 0.0
    if mad > 0:
        robust = 0.6745 * (distance - median) / mad
    else:  # more than half the items equally far: anything farther is an outlier
        robust = np.where(distance > median, np.inf, 0.0)
    return distance.astype(np.float32), robust.astype(np.float32), robust > z


def label_votes(labels: np.ndarray, rows: np.ndarray, scores: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mistakenness, predicted label, share of the predicted label)`` from the similarity-weighted
    (negative similarities count 0) labels of each item's neighbours; unlabelled items (label < 0) and
    items without labelled neighbours get mistakenness NaN and prediction -1."""
    n, k = rows.shape
    neighbour_labels = np.where(rows >= 0, labels[np.maximum(rows, 0)], -1)
    usable = (neighbour_labels >= 0) & np.isfinite(scores)
    weights = np.where(usable, np.clip(scores, 0.0, None), 0.0).astype(np.float64)
    total = weights.sum(axis=1)
    agree = (weights * (neighbour_labels == labels[:, None])).sum(axis=1)
    mistakenness = np.divide(total - agree, total, out=np.full(n, np.nan), where=total > 0)
    predicted = np.full(n, -1, dtype=np.int64)
    share = np.zeros(n, dtype=np.float64)
    best = np.zeros(n, dtype=np.float64)
    for column in range(k):  # each distinct neighbour label's total weight, without an n x classes matrix
        candidate = neighbour_labels[:, column]
        vote = (weights * (neighbour_labels == candidate[:, None])).sum(axis=1)
        better = (candidate >= 0) & (vote > best)
        best = np.where(better, vote, best)
        predicted = np.where(better, candidate, predicted)
    share = np.divide(best, total, out=share, where=total > 0)
    unlabelled = labels < 0
    mistakenness[unlabelled] = np.nan
    return mistakenness.astype(np.float32), predicted, share.astype(np.float32)


# -- tables -----------------------------------------------------------------------------------------


def _keep_one(groups: np.ndarray, split_rank: np.ndarray) -> np.ndarray:
    """In each group (>= 0) keep one member: the highest-priority split, then the first row."""
    keep = np.zeros(len(groups), dtype=bool)
    members = np.flatnonzero(groups >= 0)
    if len(members):
        order = members[np.lexsort((members, -split_rank[members], groups[members]))]
        first = np.ones(len(order), dtype=bool)
        first[1:] = groups[order][1:] != groups[order][:-1]
        keep[order[first]] = True
    return keep


def _best_partner(n: int, pairs: np.ndarray, scores: np.ndarray, allowed: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Each row's most similar partner among ``pairs`` (``allowed`` masks the pairs) and the index of that
    pair in ``pairs``; -1 / -1 if none."""
    partner = np.full(n, -1, dtype=np.int64)
    chosen = np.full(n, -1, dtype=np.int64)
    index = np.arange(len(pairs)) if allowed is None else np.flatnonzero(allowed)
    if not len(index):
        return partner, chosen
    a = np.concatenate([pairs[index, 0], pairs[index, 1]])
    b = np.concatenate([pairs[index, 1], pairs[index, 0]])
    s = np.concatenate([scores[index], scores[index]])
    where = np.concatenate([index, index])
    order = np.lexsort((b, -s, a))  # per row: highest score first
    a, b, where = a[order], b[order], where[order]
    first = np.ones(len(a), dtype=bool)
    first[1:] = a[1:] != a[:-1]
    partner[a[first]], chosen[a[first]] = b[first], where[first]
    return partner, chosen


def _pick(values: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """``values[chosen]`` as float32, -inf where ``chosen`` is -1."""
    out = np.full(len(chosen), -np.inf, dtype=np.float32)
    out[chosen >= 0] = values[chosen[chosen >= 0]]
    return out


def _member_table(rows: np.ndarray, groups: np.ndarray, base: dict, extra: dict) -> Any:
    import pyarrow as pa

    order = rows[np.lexsort((rows, groups[rows]))]
    columns = {"group": groups[order]}
    columns.update({name: np.asarray(values)[order] for name, values in base.items()})
    columns.update({name: np.asarray(values)[order] for name, values in extra.items()})
    return pa.table({name: (values.tolist() if values.dtype == object else values) for name, values in columns.items()})


def content_hashes(metadata: Any, progress: bool = True) -> list[str]:
    """The SHA-256 of every row's encoded image bytes, as read from its shard."""
    return read_images(metadata, hashes=True, thumbs=False, progress=progress)[0]


def read_images(metadata: Any, hashes: bool, thumbs: bool, progress: bool = True, small: bool = False
                ) -> tuple[list[str], np.ndarray | None] | tuple[list[str], np.ndarray | None, np.ndarray | None]:
    """One pass over the shards: each row's SHA-256 (``""`` when ``hashes`` is off) and, when ``thumbs``,
    its thumbnail vector (``thumbnail_vectors``; float32 [n, 3 * THUMB_GRID**2], a temporary-file memmap
    beyond ``THUMB_MEMORY_BYTES``); with ``small`` also a third item, the uint8 [n, ALIGN_SIZE,
    ALIGN_SIZE, 3] images of the aligned check. Decoding is done here because the bytes are in hand."""
    n = metadata.num_rows
    digests = [""] * n
    vectors = _thumb_array(n, 3 * THUMB_GRID * THUMB_GRID) if thumbs else None
    smalls = _thumb_array(n, ALIGN_SIZE * ALIGN_SIZE * 3, np.uint8).reshape(n, ALIGN_SIZE, ALIGN_SIZE, 3) \
        if thumbs and small else None
    pending_rows: list[int] = []
    pending: list[np.ndarray] = []
    desc = "hashing and thumbnailing images" if hashes and thumbs else "hashing images" if hashes else "thumbnails"
    for row, data in _progress(iter_image_bytes(metadata), progress, desc, total=n, unit="img"):
        if hashes:
            digests[row] = hashlib.sha256(data).hexdigest()
        if vectors is not None:
            pending_rows.append(row)
            pending.append(small_image(data))
            if len(pending) == IMAGE_BATCH:
                _store(vectors, smalls, pending_rows, np.stack(pending))
                pending_rows, pending = [], []
    if vectors is not None and pending:
        _store(vectors, smalls, pending_rows, np.stack(pending))
    return (digests, vectors, smalls) if small else (digests, vectors)


def _store(vectors: np.ndarray, smalls: np.ndarray | None, rows: list[int], images: np.ndarray) -> None:
    vectors[rows] = thumbnail_vectors(images)
    if smalls is not None:
        factor = images.shape[1] // ALIGN_SIZE
        reduced = images.astype(np.float32).reshape(len(images), ALIGN_SIZE, factor, ALIGN_SIZE, factor, 3)
        smalls[rows] = np.round(reduced.mean(axis=(2, 4))).astype(np.uint8)


def _thumb_array(n: int, dim: int, dtype: Any = np.float32) -> np.ndarray:
    """A [n, dim] array in memory, or in an anonymous temporary file when it is large."""
    if n * dim * np.dtype(dtype).itemsize <= THUMB_MEMORY_BYTES:
        return np.zeros((n, dim), dtype=dtype)
    handle = tempfile.TemporaryFile(prefix="manyview-thumbs-")  # removed when the memmap is collected
    return np.memmap(handle, dtype=dtype, mode="w+", shape=(n, dim))


def small_image(data: bytes, size: int = THUMB_SIZE, blur: float = THUMB_BLUR) -> np.ndarray:
    """An encoded image as a ``size`` x ``size`` RGB uint8 array, area-averaged (JPEGs decoded at a reduced
    scale first) and Gaussian-blurred by ``blur`` pixels; a grey image for bytes that do not decode (it
    verifies with nothing)."""
    from PIL import Image, ImageFilter

    try:
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (2 * size, 2 * size))
        image = image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return np.full((size, size, 3), 128, dtype=np.uint8)
    if image.size != (size, size):
        image = image.resize((size, size), Image.BOX)
    if blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(image, dtype=np.uint8)


def thumbnail_vectors(images: np.ndarray, grid: int = THUMB_GRID) -> np.ndarray:
    """Unit thumbnail vectors [b, 3 * grid**2] of uint8 images [b, s, s, 3]: each channel averaged down to
    ``grid`` x ``grid`` and standardised (mean 0, spread 1: a colour shift or contrast change cancels out),
    then the whole scaled to length 1, so the dot product of two is the mean correlation of their channels.
    A flat channel stays 0; a flat image is the zero vector (similarity 0 to everything)."""
    count, size = images.shape[0], images.shape[1]
    if size % grid:
        raise CurationError(f"thumbnail size {size} is not a multiple of the grid {grid}")
    cell = size // grid
    pooled = images.astype(np.float32).reshape(count, grid, cell, grid, cell, 3).mean(axis=(2, 4))
    pooled -= pooled.mean(axis=(1, 2), keepdims=True)
    spread = pooled.std(axis=(1, 2), keepdims=True)
    pooled = np.divide(pooled, spread, out=np.zeros_like(pooled), where=spread > 0.5)
    flat = pooled.transpose(0, 3, 1, 2).reshape(count, -1)
    norm = np.linalg.norm(flat, axis=1, keepdims=True)
    return np.divide(flat, norm, out=np.zeros_like(flat), where=norm > 0).astype(np.float32)


def shards_readable(metadata: Any) -> bool:
    """Whether every shard the metadata names exists (``--verify auto`` verifies only then)."""
    shards = set(str(shard) for shard in metadata.column("shard").to_pylist())
    return bool(shards) and all(shard and storage.exists(shard) for shard in shards)


def curate_index(index: Any, params: Params | None = None, progress: bool = True,
                 vectors: np.ndarray | None = None) -> Result:
    """Compute every table for a loaded ``index.search.Index`` (``vectors``: its rows' vectors, when the
    caller has them already)."""
    params = params or Params()
    params.check()
    timings: dict[str, float] = {}
    tick = time.perf_counter()
    source = "given"
    if vectors is None:
        vectors, source = collection_vectors(index, progress)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.shape != (index.count, index.dim):
        raise CurationError(f"vectors of shape {vectors.shape} for an index of {index.count} x {index.dim}")
    timings["vectors_seconds"] = round(time.perf_counter() - tick, 3)
    n = index.count
    metadata = index.metadata
    ids = np.asarray(index.ids, dtype=np.int64)
    keys = np.asarray(metadata.column("key").to_pylist(), dtype=object)
    shards = np.asarray(metadata.column("shard").to_pylist(), dtype=object)
    labels = np.asarray(metadata.column("label").to_numpy(zero_copy_only=False), dtype=np.int64)
    label_names = np.asarray(metadata.column("label_name").to_pylist(), dtype=object)
    splits = np.asarray(split_column([str(shard) for shard in shards]), dtype=object)
    split_rank = np.asarray([SPLIT_PRIORITY.get(split, 0) for split in splits], dtype=np.int64)
    base = {"id": ids, "key": keys, "shard": shards, "split": splits}

    verified = params.verify == "thumbnail" or (params.verify == "auto" and shards_readable(metadata))
    if params.verify == "auto" and not verified:
        logger.info("the shards cannot be read: near-duplicates from the embeddings alone (--verify none)")
    tick = time.perf_counter()
    if params.hashes or verified:
        digests, thumbs, smalls = read_images(metadata, params.hashes, verified, progress, small=True)
    else:
        digests, thumbs, smalls = [""] * n, None, None
    timings["hash_seconds"] = round(time.perf_counter() - tick, 3)  # the pass over the shards: hashes, thumbnails
    verifier = Verifier(thumbs, params.verify_threshold, smalls) if thumbs is not None else None

    hood = neighbourhood(index, vectors, params.k, params.edge_threshold(verified), progress, verifier=verifier,
                         candidates=params.candidates if verified else 0)
    timings["knn_seconds"] = round(hood.seconds, 3)
    if not verified and n > 1 and float(np.median(hood.scores[:, 0])) >= params.threshold:
        logger.warning("half the items have a neighbour at cosine >= %.3f (median nearest neighbour %.3f): this "
                       "encoder puts distinct images that close, so the near-duplicate groups will be huge; raise "
                       "--threshold (curation.json lists the nearest-neighbour percentiles)", params.threshold,
                       float(np.median(hood.scores[:, 0])))

    tick = time.perf_counter()
    pixel = hood.pair_verify if hood.pair_verify is not None else np.full(len(hood.pairs), np.nan, np.float32)
    rank_by = pixel if verified else hood.pair_scores  # a member's match: the best pixel agreement, else cosine
    near = np.ones(len(hood.pairs), dtype=bool) if verified else hood.pair_scores >= params.threshold
    dup_groups = group_numbers(components(n, hood.pairs[near]))
    partner, chosen = _best_partner(n, hood.pairs, rank_by, near)
    in_group = np.flatnonzero(dup_groups >= 0)
    near_table = _member_table(in_group, dup_groups, base, {
        "score": _pick(hood.pair_scores, chosen), "pixel_score": _pick(pixel, chosen),
        "match_id": np.where(partner >= 0, ids[np.maximum(partner, 0)], -1),
        "keep": _keep_one(dup_groups, split_rank)})

    leak_threshold = params.threshold if params.leak_threshold is None else params.leak_threshold
    cross = (near if verified else hood.pair_scores >= leak_threshold) \
        & (splits[hood.pairs[:, 0]] != splits[hood.pairs[:, 1]]) \
        & (splits[hood.pairs[:, 0]] != "") & (splits[hood.pairs[:, 1]] != "")
    leak_groups = group_numbers(components(n, hood.pairs[cross]))
    leak_partner, leak_chosen = _best_partner(n, hood.pairs, rank_by, cross)
    leaking = np.flatnonzero(leak_partner >= 0)
    top_rank = np.full(int(leak_groups.max()) + 1 if len(leak_groups) else 0, -1, dtype=np.int64)
    np.maximum.at(top_rank, leak_groups[leaking], split_rank[leaking])
    drop = np.zeros(n, dtype=bool)
    drop[leaking] = split_rank[leaking] < top_rank[leak_groups[leaking]]
    leak_table = _member_table(leaking, leak_groups, base, {
        "score": _pick(hood.pair_scores, leak_chosen), "pixel_score": _pick(pixel, leak_chosen),
        "match_id": np.where(leak_partner >= 0, ids[np.maximum(leak_partner, 0)], -1),
        "match_split": np.where(leak_partner >= 0, splits[np.maximum(leak_partner, 0)], ""), "drop": drop})
    timings["groups_seconds"] = round(time.perf_counter() - tick, 3)

    hashes = np.asarray(digests, dtype=object)
    if params.hashes:
        exact_groups = group_numbers(np.unique(hashes, return_inverse=True)[1].astype(np.int64))
    else:
        exact_groups = np.full(n, -1, dtype=np.int64)
    exact_table = _member_table(np.flatnonzero(exact_groups >= 0), exact_groups, base,
                                {"hash": hashes, "keep": _keep_one(exact_groups, split_rank)})

    tick = time.perf_counter()
    clusters = params.clusters or min(MAX_CLUSTERS, max(1, int(round(np.sqrt(n)))))
    cluster, centrality = kmeans(vectors, clusters, params.seed)
    timings["kmeans_seconds"] = round(time.perf_counter() - tick, 3)
    unique = uniqueness(hood.scores)
    represent = representativeness(cluster, centrality)
    outlier_score, robust, outlier = outlier_scores(hood.scores, params.outlier_z)
    mistakenness, predicted, share = label_votes(labels, hood.rows, hood.scores)
    likely = (labels >= 0) & (predicted >= 0) & (predicted != labels) & (share >= params.mistake_share)
    classes = _class_names(labels, label_names)
    predicted_name = np.asarray([classes.get(int(p), "") for p in predicted], dtype=object)
    nn_row = hood.rows[:, 0]
    scores = _score_table(base, {
        "label": labels, "label_name": label_names,
        "uniqueness": unique, "representativeness": represent, "cluster": cluster, "centrality": centrality,
        "outlier_score": outlier_score, "outlier_z": robust, "outlier": outlier,
        "mistakenness": mistakenness, "predicted_label": predicted, "predicted_label_name": predicted_name,
        "predicted_share": share, "likely_mistake": likely,
        "nn_id": np.where(nn_row >= 0, ids[np.maximum(nn_row, 0)], -1), "nn_score": hood.scores[:, 0],
        "duplicate_group": dup_groups, "exact_group": exact_groups, "leak_group": leak_groups})
    mistakes = scores.filter(_mask(likely)).take(_descending(mistakenness[likely], share[likely]))
    outliers = scores.filter(_mask(outlier)).take(_descending(robust[outlier]))
    tables = {"near_duplicates": near_table, "exact_duplicates": exact_table, "leaks": leak_table,
              "scores": scores, "label_mistakes": mistakes, "outliers": outliers}
    summary = {
        "params": {**params.__dict__, "leak_threshold": leak_threshold, "clusters": int(clusters),
                   "search_params": search_params(index, max(params.k, params.candidates if verified else 0))},
        "verification": {
            "mode": "thumbnail" if verified else "none", "requested": params.verify,
            **({"thumbnail": {"size": THUMB_SIZE, "blur": THUMB_BLUR, "grid": THUMB_GRID, "channels": 3,
                              "normalised": "per channel mean 0, spread 1; cosine of the 192-vectors",
                              "aligned": {"size": ALIGN_SIZE, "crops": list(ALIGN_CROPS), "gate": ALIGN_GATE,
                                          "pairs": int(verifier.aligned)}},
                "candidates": params.candidates, "candidate_threshold": params.candidate_threshold,
                "threshold": params.verify_threshold} if verified else {"threshold": params.threshold}),
            "pairs_examined": int(hood.examined), "pairs_rejected": int(hood.rejected),
            "pairs_accepted": int(len(hood.pairs))},
        "count": n, "dim": index.dim, "vectors_from": source,
        "splits": {split or "unknown": int((splits == split).sum()) for split in sorted(set(splits.tolist()))},
        "near_duplicates": {"groups": int(dup_groups.max() + 1), "items": int((dup_groups >= 0).sum()),
                            "to_drop": int((dup_groups >= 0).sum() - (dup_groups.max() + 1))},
        "exact_duplicates": {"groups": int(exact_groups.max() + 1), "items": int((exact_groups >= 0).sum()),
                             "hashed": bool(params.hashes)},
        "leaks": {"pairs": int(cross.sum()), "items": int(len(leaking)), "to_drop": int(drop.sum())},
        "label_mistakes": int(likely.sum()), "labelled": int((labels >= 0).sum()), "outliers": int(outlier.sum()),
        "rows_widened": int(hood.widened),
        "nn_score_percentiles": {str(q): float(np.percentile(hood.scores[:, 0][np.isfinite(hood.scores[:, 0])], q))
                                 for q in (50, 90, 99, 99.9)} if n > 1 else {},
        **timings,
    }
    return Result(tables, summary)


def _class_names(labels: np.ndarray, names: np.ndarray) -> dict[int, str]:
    found: dict[int, str] = {}
    for label, name in zip(labels.tolist(), names.tolist()):
        if label >= 0 and label not in found and name:
            found[label] = str(name)
    return found


def _mask(values: np.ndarray) -> Any:
    import pyarrow as pa

    return pa.array(np.asarray(values, dtype=bool))


def _descending(*keys: np.ndarray) -> np.ndarray:
    """Row order sorting by ``keys`` (first is primary), all descending."""
    if not len(keys[0]):
        return np.zeros(0, dtype=np.int64)
    return np.lexsort(tuple(-np.nan_to_num(np.asarray(key, dtype=np.float64), nan=-np.inf) for key in reversed(keys)))


def _score_table(base: dict, extra: dict) -> Any:
    import pyarrow as pa

    columns = {**base, **extra}
    return pa.table({name: (np.asarray(values).tolist() if np.asarray(values).dtype == object else np.asarray(values))
                     for name, values in columns.items()})


# -- writing ----------------------------------------------------------------------------------------


def write_result(result: Result, output: str | os.PathLike) -> Path:
    """Write every table and then ``curation.json`` (the summary, last: its presence means complete)."""
    import pyarrow.parquet as pq

    directory = Path(output)
    directory.mkdir(parents=True, exist_ok=True)
    for name, table in result.tables.items():
        storage.replace_local(directory / f"{name}.parquet",
                              lambda temporary, table=table: pq.write_table(table, temporary))

    def dump(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(result.summary, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())

    storage.replace_local(directory / SUMMARY_FILE, dump)
    return directory


def curate(index_dir: str | os.PathLike, output: str | os.PathLike | None = None, params: Params | None = None,
           progress: bool = True, use_gpu: bool | None = None) -> Result:
    """Load the index in ``index_dir``, compute every table and write them to ``output``
    (default ``index_dir/curation``). Raises ``CurationError`` for a directory that holds no index."""
    from index.search import Index

    directory = Path(index_dir).expanduser()
    if not directory.is_dir():
        raise CurationError(f"index directory {str(directory)!r} does not exist; give the RUN/index directory "
                            "written by python -m index.build")
    if not (directory / "index.json").is_file():
        raise CurationError(f"{str(directory)!r} holds no index.json: it is not an index directory "
                            "(build one with python -m index.build --encoder RUN/onnx --data SHARDS "
                            "--output RUN/index)")
    started = time.perf_counter()
    index = Index.load(directory, use_gpu=use_gpu)
    return curate_loaded(index, output, params, progress, started)


def curate_loaded(index: Any, output: str | os.PathLike | None = None, params: Params | None = None,
                  progress: bool = True, started: float | None = None) -> Result:
    """``curate`` for an index already loaded (the app's): compute, record which index generation the
    tables describe (``index_files``, to tell stale tables), write to ``output`` (default INDEX/curation)."""
    started = time.perf_counter() if started is None else started
    result = curate_index(index, params, progress)
    result.summary.update({
        "index": str(Path(index.directory).resolve()), "index_files": generation_of(index.info),
        "index_created": index.info.get("created"), "encoder_fingerprint": index.info.get("encoder_fingerprint"),
        "seconds": round(time.perf_counter() - started, 3),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    })
    write_result(result, output if output is not None else Path(index.directory) / OUTPUT_DIRNAME)
    return result


def is_stale(summary: dict, index: Any) -> bool:
    """Whether curation tables were computed from another generation of the index than the one loaded."""
    return summary.get("index_files") != generation_of(index.info) or summary.get("count") != index.count


def generation_of(info: dict) -> Any:
    """What names one committed generation of an index: its files, or a set's member directories."""
    return info.get("files") or info.get("members")


def read_tables(directory: str | os.PathLike) -> tuple[dict[str, Any], dict]:
    """The tables and summary of a curation directory; ``CurationError`` when it holds none."""
    import pyarrow.parquet as pq

    folder = Path(directory)
    summary_path = folder / SUMMARY_FILE
    if not summary_path.is_file():
        raise CurationError(f"no curation results in {str(folder)!r}; "
                            "run python -m index.curate --index RUN/index first")
    with open(summary_path, encoding="utf-8") as handle:
        summary = json.load(handle)
    tables = {name: pq.read_table(str(folder / f"{name}.parquet")) for name in TABLE_NAMES
              if (folder / f"{name}.parquet").is_file()}
    return tables, summary


DROP_SOURCES = {
    "near_duplicates": ("keep", False),
    "exact_duplicates": ("keep", False),
    "leaks": ("drop", True),
    "outliers": (None, None),
    "label_mistakes": (None, None),
}


def ids_to_drop(tables: dict[str, Any], include: Sequence[str] = ("near_duplicates", "exact_duplicates", "leaks")
                ) -> list[dict]:
    """The items to remove, one dict per id (``id``, ``key``, ``shard``, ``reasons``: the tables that name it),
    in id order: near-/exact-duplicate members that are not their group's kept one, the lower-split copy of
    each leak, and every row of ``outliers`` / ``label_mistakes`` when included."""
    unknown = [name for name in include if name not in DROP_SOURCES]
    if unknown:
        raise CurationError(f"cannot drop by {unknown}; choose among {sorted(DROP_SOURCES)}")
    found: dict[int, dict] = {}
    for name in include:
        table = tables.get(name)
        if table is None or table.num_rows == 0:
            continue
        column, wanted = DROP_SOURCES[name]
        rows = [row for row in table.to_pylist() if column is None or bool(row[column]) == wanted]
        for row in rows:
            entry = found.setdefault(int(row["id"]), {"id": int(row["id"]), "key": row["key"], "shard": row["shard"],
                                                      "reasons": []})
            if name not in entry["reasons"]:
                entry["reasons"].append(name)
    return [found[number] for number in sorted(found)]


# -- command line -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m index.curate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", required=True, help="index directory written by python -m index.build (RUN/index)")
    parser.add_argument("--output", help="where to write the tables (default: INDEX/curation)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help=f"cosine similarity at or above which two items are near-duplicates ({DEFAULT_THRESHOLD})")
    parser.add_argument("--leak-threshold", type=float, default=None,
                        help="cosine similarity for train/test leaks (default: --threshold)")
    parser.add_argument("--k", type=int, default=DEFAULT_K, help=f"neighbours per item for the scores ({DEFAULT_K})")
    parser.add_argument("--clusters", type=int, default=None,
                        help=f"k-means clusters for representativeness (default sqrt(n), at most {MAX_CLUSTERS})")
    parser.add_argument("--outlier-z", type=float, default=DEFAULT_OUTLIER_Z,
                        help=f"modified z-score above which an item is an outlier ({DEFAULT_OUTLIER_Z})")
    parser.add_argument("--mistake-share", type=float, default=DEFAULT_MISTAKE_SHARE,
                        help="share of neighbour votes another label needs to flag a label mistake "
                        f"({DEFAULT_MISTAKE_SHARE})")
    parser.add_argument("--verify", choices=VERIFY_MODES, default="auto",
                        help="thumbnail: keep an embedding candidate pair only when the images' pixel thumbnails "
                        "agree; none: the embedding cosine alone (--threshold); auto (default): thumbnail when "
                        "every shard can be read")
    parser.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES,
                        help=f"embedding neighbours per item proposed for verification ({DEFAULT_CANDIDATES})")
    parser.add_argument("--candidate-threshold", type=float, default=DEFAULT_CANDIDATE_THRESHOLD,
                        help="embedding cosine a candidate pair needs before verification "
                        f"({DEFAULT_CANDIDATE_THRESHOLD})")
    parser.add_argument("--verify-threshold", type=float, default=DEFAULT_VERIFY_THRESHOLD,
                        help=f"thumbnail similarity at or above which a candidate pair is a near-duplicate "
                        f"({DEFAULT_VERIFY_THRESHOLD})")
    parser.add_argument("--no-hash", action="store_true",
                        help="skip exact duplicates (they read every image from its shard)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("--cpu", action="store_true", help="search on the CPU even if a GPU is present")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: prints the summary and returns the exit status (2 for bad input)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = Params(threshold=args.threshold, leak_threshold=args.leak_threshold, k=args.k, clusters=args.clusters,
                    outlier_z=args.outlier_z, mistake_share=args.mistake_share, hashes=not args.no_hash,
                    verify=args.verify, candidates=args.candidates, candidate_threshold=args.candidate_threshold,
                    verify_threshold=args.verify_threshold)
    try:
        params.check()
        result = curate(args.index, args.output, params, progress=not args.no_progress,
                        use_gpu=False if args.cpu else None)
    except (CurationError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError) as error:  # IndexLoadError and friends: a damaged index
        print(f"error: {error}", file=sys.stderr)
        return 2
    output = args.output or str(Path(args.index) / OUTPUT_DIRNAME)
    print(json.dumps({**result.summary, "output": output}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
