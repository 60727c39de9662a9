"""Build an exact inner-product FAISS index over a shard set's image embeddings.

    python -m index.build --encoder RUN/onnx --data 'SHARDS/test-*.tar.gz' --output RUN/index \
        [--batch-size 256] [--limit N]

Writes, into ``--output``:

* ``index.faiss``       ``IndexIDMap2`` over a ``"Flat"`` inner-product index; faiss ids are sample ids
* ``metadata.parquet``  one row per indexed sample: id, key, shard, label, label_name, caption
* ``index.json``        factory, metric, dim, count, skipped, encoder, encoder_model, data,
                        build_seconds, has_text, created, recall (measured against numpy brute force)

The three files are first written to temporary names in the output directory and then moved into
place with ``os.replace``, so a failed build leaves a previous index untouched. Embeddings are
L2-normalised, so inner product is cosine similarity. No torch is imported.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from export.runtime import Encoder
from trainer.data.shards import ShardSample, decode_image, expand_patterns, iter_samples, read_manifest

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
METADATA_FILE = "metadata.parquet"
INFO_FILE = "index.json"
FACTORY = "Flat"
METRIC = "inner_product"
RECALL_K = 10
RECALL_QUERIES = 100
# Only a handful of unreadable keys are named in logs and index.json; the count covers the rest.
MAX_SKIPPED_KEYS = 20


@dataclass
class _Collected:
    """Per-sample metadata gathered while streaming, in insertion order."""

    ids: list[int] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    label_names: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    skipped: int = 0
    skipped_keys: list[str] = field(default_factory=list)
    queries: list[np.ndarray] = field(default_factory=list)
    seen_ids: dict[int, str] = field(default_factory=dict)


# -- FAISS helpers --------------------------------------------------------------------------------


def gpu_copy(cpu_index: Any, use_gpu: bool | None = None) -> tuple[Any, Any]:
    """``(index on GPU 0, gpu_resources)`` when faiss sees a GPU (and ``use_gpu`` allows it), else
    ``(cpu_index, None)``; an unusable GPU falls back to the CPU with a warning. The resources object must
    outlive the GPU index."""
    import faiss

    if use_gpu is None:
        use_gpu = faiss.get_num_gpus() > 0
    if not use_gpu:
        return cpu_index, None
    try:
        resources = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(resources, 0, cpu_index), resources
    except Exception as error:  # noqa: BLE001 - exact search on the CPU is always possible
        logger.warning("faiss could not copy the index to the GPU (%s); using the CPU", error)
        return cpu_index, None


def new_index(dim: int, use_gpu: bool | None = None) -> tuple[Any, Any]:
    """An empty ``IndexIDMap2(Flat, inner product)``, moved to GPU 0 when faiss sees one (``gpu_copy``)."""
    import faiss

    return gpu_copy(faiss.IndexIDMap2(faiss.index_factory(dim, FACTORY, faiss.METRIC_INNER_PRODUCT)), use_gpu)


def to_cpu(index: Any, gpu_resources: Any) -> Any:
    """The CPU copy of ``index``: itself when it was built on the CPU (``gpu_resources`` is None)."""
    import faiss

    return index if gpu_resources is None else faiss.index_gpu_to_cpu(index)


def measure_recall(index: Any, cpu_index: Any, queries: np.ndarray, k: int = RECALL_K) -> dict:
    """Recall@k of ``index.search`` against numpy brute force over the stored vectors.

    A returned neighbour counts as correct when its exact score reaches the k-th exact score (so
    ties between equal vectors do not count as misses). For the exact "Flat" index this is 1.0 up
    to float error; it guards the GPU path and documents the number the design asks for.
    """
    import faiss

    count = int(cpu_index.ntotal)
    k = min(k, count)
    if len(queries) == 0 or k == 0:
        return {"k": k, "queries": 0, "recall": None}
    flat = faiss.downcast_index(cpu_index.index)
    id_map = faiss.vector_to_array(cpu_index.id_map)
    exact_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    chunk = 65536  # bounded memory even for millions of stored vectors
    for start in range(0, count, chunk):
        block = flat.reconstruct_n(start, min(chunk, count - start))
        scores = np.concatenate([exact_scores, queries @ block.T], axis=1)
        exact_scores = -np.sort(-scores, axis=1)[:, :k]
    _, found = index.search(queries, k)
    position = {int(sample_id): row for row, sample_id in enumerate(id_map)}
    hits = 0
    for row, ids in enumerate(found):
        kth = exact_scores[row, -1]
        for sample_id in ids:
            if sample_id < 0:
                continue
            vector = flat.reconstruct(position[int(sample_id)])
            hits += float(queries[row] @ vector) >= kth - 1e-5
    return {"k": k, "queries": int(len(queries)), "recall": hits / (len(queries) * k)}


# -- streaming --------------------------------------------------------------------------------------


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


def _label_name(label: int, classes: Sequence[str]) -> str:
    return str(classes[label]) if 0 <= label < len(classes) else ""


def _decoded(samples: Iterator[ShardSample], collected: _Collected, mode: str) -> Iterator[tuple[ShardSample, Any]]:
    """Decode each sample's image, counting (and skipping) those without a readable image."""
    for sample in samples:
        try:
            if sample.image is None:
                raise ValueError("no image member")
            image = decode_image(sample.image, mode=mode)
        except ValueError as error:
            collected.skipped += 1
            if len(collected.skipped_keys) < MAX_SKIPPED_KEYS:
                collected.skipped_keys.append(sample.key)
                logger.warning("skipping %s in %s: %s", sample.key, sample.url, error)
            continue
        yield sample, image


def _record(collected: _Collected, sample: ShardSample, classes: Sequence[str]) -> None:
    previous = collected.seen_ids.get(sample.sample_id)
    if previous is not None:
        raise ValueError(
            f"duplicate sample id {sample.sample_id}: {previous!r} and {sample.key!r} ({sample.url}); "
            "ids must be unique across the indexed shards"
        )
    collected.seen_ids[sample.sample_id] = sample.key
    collected.ids.append(int(sample.sample_id))
    collected.keys.append(sample.key)
    collected.shards.append(os.path.abspath(sample.url))
    collected.labels.append(int(sample.label))
    collected.label_names.append(_label_name(sample.label, classes))
    collected.captions.append(sample.caption)


def _add_batch(index: Any, encoder: Encoder, images: list, ids: list[int], collected: _Collected, batch_size: int) -> None:
    vectors = encoder.encode_images(images, batch_size=batch_size)
    if vectors.shape[1] != index.d:
        raise ValueError(f"encoder produced {vectors.shape[1]}-dimensional embeddings but the index has dim {index.d}")
    index.add_with_ids(vectors, np.asarray(ids, dtype=np.int64))
    room = RECALL_QUERIES - sum(len(q) for q in collected.queries)
    if room > 0:  # a few stored vectors double as recall queries
        collected.queries.append(vectors[:room].copy())


def embed_shards(
    encoder: Encoder,
    index: Any,
    shards: Sequence[str],
    classes: Sequence[str],
    batch_size: int = 256,
    limit: int | None = None,
    progress: bool = True,
    total: int | None = None,
) -> _Collected:
    """Stream the shards, embed readable images in batches and add them to ``index``."""
    from tqdm import tqdm

    collected = _Collected()
    mode = "L" if encoder.preprocess.channels == 1 else "RGB"
    images: list = []
    ids: list[int] = []
    with tqdm(total=total, unit="img", desc="indexing", disable=not progress, file=sys.stderr) as bar:
        for sample, image in _decoded(iter_samples(list(shards)), collected, mode):
            if limit is not None and len(collected.ids) >= limit:
                break
            _record(collected, sample, classes)
            images.append(image)
            ids.append(int(sample.sample_id))
            if len(images) >= batch_size:
                _add_batch(index, encoder, images, ids, collected, batch_size)
                bar.update(len(images))
                images, ids = [], []
        if images:
            _add_batch(index, encoder, images, ids, collected, batch_size)
            bar.update(len(images))
    return collected


# -- writing ----------------------------------------------------------------------------------------


def _metadata_table(collected: _Collected):
    import pyarrow as pa

    return pa.table(
        {
            "id": pa.array(collected.ids, type=pa.int64()),
            "key": pa.array(collected.keys, type=pa.string()),
            "shard": pa.array(collected.shards, type=pa.string()),
            "label": pa.array(collected.labels, type=pa.int64()),
            "label_name": pa.array(collected.label_names, type=pa.string()),
            "caption": pa.array(collected.captions, type=pa.string()),
        }
    )


def write_index_files(output_dir: Path, cpu_index: Any, table: Any, info: dict) -> None:
    """Write the three index files atomically: temporaries in ``output_dir``, then ``os.replace``.

    ``index.json`` is replaced last, so a reader that finds it also finds the matching data files.
    """
    import faiss
    import pyarrow.parquet as pq

    output_dir.mkdir(parents=True, exist_ok=True)
    tag = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temporaries = {name: output_dir / f".{name}{tag}" for name in (INDEX_FILE, METADATA_FILE, INFO_FILE)}
    try:
        faiss.write_index(cpu_index, str(temporaries[INDEX_FILE]))
        pq.write_table(table, str(temporaries[METADATA_FILE]))
        with open(temporaries[INFO_FILE], "w", encoding="utf-8") as handle:
            json.dump(info, handle, indent=2)
            handle.write("\n")
        for name in (INDEX_FILE, METADATA_FILE, INFO_FILE):
            os.replace(temporaries[name], output_dir / name)
    finally:
        for path in temporaries.values():
            if path.exists():
                path.unlink()


def build_index(
    encoder_dir: str | os.PathLike,
    data_spec: str | list[str],
    output_dir: str | os.PathLike,
    batch_size: int = 256,
    limit: int | None = None,
    progress: bool = True,
    use_gpu: bool | None = None,
) -> dict:
    """Embed every readable image of ``data_spec`` and write an exact FAISS index to ``output_dir``.

    Returns the ``index.json`` dictionary. Raises ``ShardPatternError`` when the spec names no shard,
    ``FileNotFoundError``/``EncoderError`` for an unusable encoder directory and ``ValueError`` when
    no image could be indexed or sample ids collide.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    started = time.perf_counter()
    shards = expand_patterns(data_spec)
    manifest = read_manifest(shards)
    classes = [str(name) for name in manifest.get("classes", [])]
    encoder = Encoder(encoder_dir)
    logger.info("indexing %d shard(s) with %r", len(shards), encoder)
    index, resources = new_index(encoder.dim, use_gpu)
    collected = embed_shards(
        encoder, index, shards, classes, batch_size, limit, progress, _expected_total(shards, manifest, limit)
    )
    if not collected.ids:
        raise ValueError(
            f"empty collection: no readable image in {data_spec!r} "
            f"({len(shards)} shard(s), {collected.skipped} sample(s) skipped)"
        )
    if collected.skipped:
        logger.warning("skipped %d unreadable sample(s), e.g. %s", collected.skipped, collected.skipped_keys[:5])
    cpu_index = to_cpu(index, resources)
    recall = measure_recall(index, cpu_index, np.concatenate(collected.queries))
    info = {
        "factory": FACTORY,
        "metric": METRIC,
        "dim": int(encoder.dim),
        "count": int(cpu_index.ntotal),
        "skipped": int(collected.skipped),
        "skipped_keys": collected.skipped_keys,
        "encoder": str(encoder.directory),
        "encoder_model": encoder.info.get("model"),
        "data": data_spec if isinstance(data_spec, str) else "::".join(data_spec),
        "shards": [os.path.abspath(shard) for shard in shards],
        "build_seconds": round(time.perf_counter() - started, 3),
        "has_text": bool(encoder.has_text),
        "recall": recall,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_index_files(Path(output_dir), cpu_index, _metadata_table(collected), info)
    logger.info("wrote %d vectors (dim %d) to %s", info["count"], info["dim"], output_dir)
    return info


# -- command line -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m index.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", required=True, help="exported encoder directory (RUN/onnx)")
    parser.add_argument("--data", required=True, help="shard spec: brace pattern, glob, directory, or '::'-joined")
    parser.add_argument("--output", required=True, help="index directory to write (RUN/index)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per encoder call (default 256)")
    parser.add_argument("--limit", type=int, default=None, help="index at most this many images")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--cpu", action="store_true", help="keep the FAISS index on the CPU even if a GPU is present")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; prints index.json and returns the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        info = build_index(
            args.encoder,
            args.data,
            args.output,
            batch_size=args.batch_size,
            limit=args.limit,
            progress=not args.no_progress,
            use_gpu=False if args.cpu else None,
        )
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
