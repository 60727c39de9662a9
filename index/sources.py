"""Where the vectors of an index come from: shards through an ONNX encoder, or extracted embeddings.

Both sources give the same thing: ``dim``, ``count``, ``blocks()`` (re-iterable ``(float32 [n, D]
L2-normalised, pyarrow.Table of n metadata rows)``), ``describe()`` (entries for ``index.json``) and
the encoder's ``fingerprint``. ``ShardSource`` embeds the images once and keeps the vectors in memory
(fine up to a few million vectors; beyond that extract with ``export.extract`` and use
``EmbeddingsSource``, which streams the parts from disk on every pass). No torch is imported.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from export.contract import declares_text
from export.embeddings import MetadataRows
from index.duplicates import duplicate_id_message
from trainer.data import storage
from trainer.data.shards import ShardSample, decode_image, expand_patterns, iter_samples, read_manifest

logger = logging.getLogger(__name__)

# Only a handful of unreadable keys are named in logs and index.json; the count covers the rest.
MAX_SKIPPED_KEYS = 20


@dataclass
class _Pending(MetadataRows):
    """One batch of decoded images and their metadata, waiting for the encoder."""

    images: list = field(default_factory=list)


def _expected_total(shards: Sequence[str], manifest: dict, limit: int | None) -> int | None:
    """Sample count for the progress bar, from the manifest's per-file counts when it has them."""
    counts: dict[str, int] = {}
    for entries in (manifest.get("splits") or {}).values():
        for entry in entries or []:
            if isinstance(entry, dict) and "file" in entry and "samples" in entry:
                counts[str(entry["file"])] = int(entry["samples"])
    total: int | None = None
    if counts and all(os.path.basename(shard) in counts for shard in shards):
        total = sum(counts[os.path.basename(shard)] for shard in shards)
    if limit is not None:
        total = limit if total is None else min(total, limit)
    return total


def embed_batch(encoder: Any, pending: _Pending, batch_size: int) -> tuple[np.ndarray, Any]:
    """Encode one batch; returns ``(vectors, metadata table)``."""
    vectors = encoder.encode_images(pending.images, batch_size=batch_size)
    if vectors.shape[1] != encoder.dim:
        raise ValueError(f"encoder produced {vectors.shape[1]}-dimensional embeddings but declares dim {encoder.dim}")
    return np.ascontiguousarray(vectors, dtype=np.float32), pending.table()


class ShardSource:
    """Images of a shard set, embedded once through ``export.runtime.Encoder`` and kept in memory."""

    def __init__(self, encoder_dir: str | os.PathLike, data_spec: str | list[str], batch_size: int = 256,
                 limit: int | None = None, progress: bool = True, precision: str = "auto") -> None:
        from export.embeddings import encoder_identity
        from export.runtime import Encoder

        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be positive, got {limit}")
        self.data_spec = data_spec if isinstance(data_spec, str) else "::".join(data_spec)
        self.shards = expand_patterns(data_spec)
        manifest = read_manifest(self.shards)
        self.classes = [str(name) for name in manifest.get("classes", [])]
        self.encoder = Encoder(encoder_dir, precision=precision)
        self.fingerprint = encoder_identity(self.encoder.directory, variant=self.encoder.precision)["fingerprint"]
        self.dim = int(self.encoder.dim)
        self.skipped = 0
        self.skipped_keys: list[str] = []
        logger.info("embedding %d shard(s) with %s (%s)", len(self.shards), self.encoder.describe(),
                    self.encoder.directory)
        self._blocks = list(self._embed(batch_size, limit, progress, _expected_total(self.shards, manifest, limit)))
        self.count = sum(len(vectors) for vectors, _ in self._blocks)
        if self.count == 0:
            raise ValueError(f"empty collection: no readable image in {self.data_spec!r} "
                             f"({len(self.shards)} shard(s), {self.skipped} sample(s) skipped)")
        if self.skipped:
            logger.warning("skipped %d unreadable sample(s), e.g. %s", self.skipped, self.skipped_keys[:5])

    def _decoded(self, mode: str) -> Iterator[tuple[ShardSample, Any]]:
        for sample in iter_samples(list(self.shards)):
            try:
                if sample.image is None:
                    raise ValueError("no image member")
                image = decode_image(sample.image, mode=mode)
            except ValueError as error:
                self.skipped += 1
                if len(self.skipped_keys) < MAX_SKIPPED_KEYS:
                    self.skipped_keys.append(sample.key)
                    logger.warning("skipping %s in %s: %s", sample.key, sample.url, error)
                continue
            yield sample, image

    def _embed(self, batch_size: int, limit: int | None, progress: bool,
               total: int | None) -> Iterator[tuple[np.ndarray, Any]]:
        from tqdm import tqdm

        mode = "L" if self.encoder.preprocess.channels == 1 else "RGB"
        seen: dict[int, tuple[str, str]] = {}  # id -> (key, shard), for the duplicate-id message
        pending = _Pending()
        with tqdm(total=total, unit="img", desc="embedding", disable=not progress, file=sys.stderr) as bar:
            for sample, image in self._decoded(mode):
                if limit is not None and len(seen) >= limit:
                    break
                if sample.sample_id in seen:
                    raise ValueError(duplicate_id_message(sample.sample_id, seen[sample.sample_id],
                                                          (sample.key, sample.url)))
                seen[sample.sample_id] = (sample.key, sample.url)
                pending.images.append(image)
                pending.append(sample, storage.absolute(sample.url), self.classes)
                if len(pending.images) >= batch_size:
                    yield embed_batch(self.encoder, pending, batch_size)
                    bar.update(len(pending.images))
                    pending = _Pending()
            if pending.images:
                yield embed_batch(self.encoder, pending, batch_size)
                bar.update(len(pending.images))

    def blocks(self) -> Iterator[tuple[np.ndarray, Any]]:
        return iter(self._blocks)

    def describe(self) -> dict:
        return {
            "encoder": str(self.encoder.directory),
            "encoder_model": self.encoder.info.get("model"),
            "encoder_fingerprint": self.fingerprint,
            "encoder_variant": self.encoder.precision,
            "encoder_provider": self.encoder.provider,
            "has_text": bool(self.encoder.has_text),
            "data": storage.public(self.data_spec),
            "shards": [storage.describe(shard) for shard in self.shards],
            "skipped": int(self.skipped),
            "skipped_keys": self.skipped_keys,
        }


class EmbeddingsSource:
    """An embeddings directory written by ``export.extract`` (``export.embeddings``), streamed per part; local or a
    URL (``s3://bucket/emb``: the parts are read again on every pass)."""

    def __init__(self, path: str | os.PathLike, allow_incomplete: bool = False) -> None:
        from export.embeddings import embeddings_info

        self.path = storage.absolute(path)
        self.info = embeddings_info(self.path)
        self.allow_incomplete = allow_incomplete
        if not self.info["complete"] and not allow_incomplete:
            raise ValueError(f"embeddings in {storage.public(self.path)!r} are incomplete "
                             f"({self.info['shards_done']} shard(s) done); "
                             "finish the extraction first")
        self.dim = int(self.info["dim"])
        self.count = int(self.info["count"])
        self.fingerprint = (self.info.get("encoder") or {}).get("fingerprint")
        if self.count == 0:
            raise ValueError(f"empty collection: {storage.public(self.path)!r} holds no embeddings")

    def blocks(self) -> Iterator[tuple[np.ndarray, Any]]:
        from export.embeddings import read_embeddings

        return read_embeddings(self.path, allow_incomplete=self.allow_incomplete)

    def describe(self) -> dict:
        encoder = self.info.get("encoder") or {}
        preprocess = encoder.get("preprocess") or {}
        return {
            "encoder": encoder.get("directory"),
            "encoder_model": preprocess.get("model"),
            "encoder_fingerprint": self.fingerprint,
            "encoder_variant": encoder.get("variant"),  # None for embeddings extracted before variants were recorded
            "encoder_provider": encoder.get("provider"),
            "has_text": declares_text(preprocess),
            "embeddings": storage.public(self.path),
            "data": storage.public(self.path),
            "shards": self.info.get("shards"),
            "skipped": int(self.info.get("skipped", 0)),
            "skipped_keys": [],
        }


class ArraySource:
    """Vectors already in memory (tests, benchmarks): ``ids`` default to 0..n-1, metadata left blank."""

    def __init__(self, vectors: np.ndarray, ids: np.ndarray | None = None, block: int = 65536,
                 table: Any = None) -> None:
        from export.embeddings import metadata_table

        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if self.vectors.ndim != 2:
            raise ValueError(f"vectors must be [n, D], got shape {self.vectors.shape}")
        self.count, self.dim = self.vectors.shape
        if self.count == 0:
            raise ValueError("empty collection: no vectors given")
        self.ids = np.arange(self.count, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
        n = self.count
        self.table = table if table is not None else metadata_table(
            self.ids, [str(i) for i in self.ids], [""] * n, [-1] * n, [""] * n, [""] * n)
        self.block = block
        self.fingerprint = None

    def blocks(self) -> Iterator[tuple[np.ndarray, Any]]:
        for start in range(0, self.count, self.block):
            stop = min(self.count, start + self.block)
            yield self.vectors[start:stop], self.table.slice(start, stop - start)

    def describe(self) -> dict:
        return {"data": "<array>", "skipped": 0, "skipped_keys": [], "has_text": False}
