"""Production feature extraction: WebDataset shards -> embeddings with the exported ONNX encoder.

    python -m export.extract --encoder RUN/onnx --data 'SHARDS/*.tar.gz' --output EMB \
        [--batch-size 64] [--dtype float16|float32] [--workers N] [--chunk-size 8192] \
        [--precision auto|fp32|fp16|int8] [--threads N] [--no-progress]

Streams the shards (``trainer.data.shards``, plain tar reading), decodes and resizes images in worker
processes (PIL, bounded prefetch), encodes them in batches on ONNX Runtime and writes the format of
``export/embeddings.py``: ``.npy`` parts of float16/float32 L2-normalised rows with a parquet of ids and
metadata per part, named ``<shard index>-<chunk>`` so that they read back in shard order.

Resuming: re-running the same command skips finished shards and finished chunks of the others.
Several processes (``accelerate launch``, ``torchrun``, or any launcher that sets ``RANK`` /
``WORLD_SIZE`` / ``LOCAL_RANK``): process ``r`` of ``w`` takes shards ``i`` with ``i % w == r`` and uses
GPU ``LOCAL_RANK``; they all write into the one output directory (shared storage across nodes) and
``read_embeddings`` presents the parts as one ordered set; the process that finishes last marks it complete.
Undecodable images are counted, skipped and reported (per shard in ``done/*.json`` and in the summary).
The encoder variant (``--precision``; auto: fp16 on a GPU, int8 on a CPU, when exported) and the provider
it runs on are logged, printed in the summary and recorded in ``embeddings.json``; the variant is part of
the encoder fingerprint, so an output started with one variant refuses another. No torch is imported.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import multiprocessing
import os
import sys
import tarfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from export.embeddings import (
    EmbeddingsError, done_shards, embeddings_info, encoder_identity, finalize, mark_shard_done, metadata_table,
    open_output, part_info, part_names, part_rows, write_part,
)
from export.contract import Preprocess, empty_batch, prepare_image
from export.runtime import Encoder, EncoderError
from trainer.data.shards import ShardSample, decode_image, expand_patterns, iter_shard, read_manifest

logger = logging.getLogger(__name__)

MAX_REPORTED_KEYS = 20  # per shard: the count covers the rest


def distributed_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the variables ``accelerate launch`` / ``torchrun`` set
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); ``(0, 1, 0)`` for a plain run."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as error:
        raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {error}") from error
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"invalid RANK={rank} for WORLD_SIZE={world}")
    return rank, world, local


def part_name(shard_index: int, chunk: int) -> str:
    return f"{shard_index:06d}-{chunk:06d}"


# -- decoding (runs in worker processes; must stay picklable and torch-free) ------------------------


def decode_batch(payloads: list[bytes | None], spec: dict, input_format: str) -> tuple[np.ndarray, list[str | None]]:
    """Encoded image bytes -> (stacked encoder inputs of the decodable ones, per-payload error or None)."""
    preprocess = Preprocess.from_dict(spec)
    mode = "L" if preprocess.channels == 1 else "RGB"
    arrays, errors = [], []
    for data in payloads:
        if data is None:
            errors.append("no image member")
            continue
        try:
            arrays.append(prepare_image(decode_image(data, mode=mode), preprocess, input_format))
            errors.append(None)
        except (ValueError, OSError) as error:  # truncated or corrupt files fail late, in resize
            errors.append(str(error))
    batch = np.stack(arrays) if arrays else empty_batch(preprocess, input_format)
    return batch, errors


class _InProcess:
    """The ``apply_async`` subset of a pool, decoding in the calling process (``--workers 0``)."""

    class _Done:
        def __init__(self, value):
            self._value = value

        def get(self):
            return self._value

    def apply_async(self, function, args):
        return self._Done(function(*args))

    def close(self) -> None:
        pass

    def join(self) -> None:
        pass


# -- streaming ----------------------------------------------------------------------------------------


@dataclass
class _Unit:
    """A run of consecutive samples of one chunk of one shard, decoded together."""

    shard_index: int
    chunk: int
    samples: list[ShardSample]
    chunk_end: bool
    shard_end: bool


def _units(plan: Sequence[str], indices: Sequence[int], batch_size: int, chunk_size: int,
           finished: set[str]) -> Iterator[_Unit]:
    """Cut the shards into decode units that never cross a chunk; skip chunks already written."""
    for shard_index in indices:
        batch: list[ShardSample] = []
        open_chunk: int | None = None  # the chunk whose samples are being yielded and not yet closed
        position = 0
        for sample in _read_shard(plan[shard_index]):
            chunk, position = position // chunk_size, position + 1
            if open_chunk is not None and chunk != open_chunk:
                yield _Unit(shard_index, open_chunk, batch, chunk_end=True, shard_end=False)
                batch, open_chunk = [], None
            if part_name(shard_index, chunk) in finished:
                continue
            open_chunk = chunk
            batch.append(sample)
            if len(batch) == batch_size:
                yield _Unit(shard_index, chunk, batch, chunk_end=False, shard_end=False)
                batch = []
        yield _Unit(shard_index, open_chunk or 0, batch, chunk_end=open_chunk is not None, shard_end=True)


def _read_shard(url: str) -> Iterator[ShardSample]:
    """``iter_shard`` with a broken archive (truncated, not a tar) reported by name instead of a bare tarfile error."""
    position = 0
    try:
        for sample in iter_shard(url):
            position += 1
            yield sample
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        raise ValueError(f"shard {url!r} is unreadable after {position} sample(s): {error}; re-create it or "
                         "leave it out of --data (finished shards are kept, so the run resumes)") from error


@dataclass
class _Chunk:
    vectors: list[np.ndarray] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    label_names: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    skipped: int = 0
    skipped_keys: list[str] = field(default_factory=list)


def _shard_totals(plan: Sequence[str], indices: Sequence[int]) -> int | None:
    """Sample count of the shards ``indices`` from the manifest beside them, when it lists them all."""
    try:
        manifest = read_manifest(list(plan))
    except (OSError, ValueError):
        return None
    counts: dict[str, int] = {}
    for entries in (manifest.get("splits") or {}).values():
        for entry in entries or []:
            if isinstance(entry, dict) and "file" in entry and "samples" in entry:
                counts[str(entry["file"])] = int(entry["samples"])
    names = [os.path.basename(plan[i]) for i in indices]
    return sum(counts[name] for name in names) if all(name in counts for name in names) else None


def _label_name(label: int, classes: Sequence[str]) -> str:
    return str(classes[label]) if 0 <= label < len(classes) else ""


def extract(
    encoder_dir: str | os.PathLike,
    data_spec: str | list[str],
    output_dir: str | os.PathLike,
    batch_size: int = 64,
    dtype: str = "float16",
    workers: int | None = None,
    chunk_size: int = 8192,
    precision: str = "auto",
    threads: int | None = None,
    progress: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    local_rank: int | None = None,
) -> dict:
    """Embed every decodable image of ``data_spec`` into ``output_dir`` (this process's share of it).

    ``rank`` / ``world_size`` / ``local_rank`` default to the launcher's environment (``distributed_env``).
    Returns a summary: shards and images this process wrote, skipped samples, seconds, images/s, and
    whether the whole output is complete. Raises ``EmbeddingsMismatchError`` when ``output_dir`` holds
    another encoder's embeddings (or other settings), ``ShardPatternError`` for a spec naming no shard,
    ``FileNotFoundError`` / ``EncoderError`` for an unusable encoder directory.
    """
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size and chunk_size must be positive, got {batch_size} and {chunk_size}")
    env_rank, env_world, env_local = distributed_env()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    local_rank = env_local if local_rank is None else local_rank
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    started = time.perf_counter()
    plan = [os.path.abspath(path) for path in expand_patterns(data_spec)]
    classes = [str(name) for name in read_manifest(plan).get("classes", [])]
    workers = max(1, min(8, (os.cpu_count() or 2) - 1)) if workers is None else workers
    # Fork the decoders before onnxruntime starts its thread pools (forking a threaded process is unsafe).
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 0 else _InProcess()
    try:
        encoder = Encoder(encoder_dir, precision=precision, threads=threads, device_id=local_rank)
        identity = encoder_identity(encoder_dir, variant=encoder.precision, provider=encoder.provider)
        open_output(output_dir, identity, encoder.dim, dtype, shards=plan,
                    extra={"data": data_spec if isinstance(data_spec, str) else "::".join(data_spec),
                           "chunk_size": chunk_size})
        finished_shards = done_shards(output_dir)
        mine = [i for i in range(len(plan)) if i % world_size == rank and i not in finished_shards]
        logger.info("rank %d/%d: %d of %d shard(s) to extract with %s (%s)", rank, world_size, len(mine), len(plan),
                    encoder.describe(), encoder.directory)
        written, skipped = _run(encoder, pool, workers, plan, mine, classes, output_dir, batch_size, chunk_size,
                                progress, rank, world_size)
    finally:
        pool.close()
        pool.join()
    seconds = time.perf_counter() - started
    complete = False
    try:
        finalize(output_dir)  # succeeds for the process that finishes the last shard
        complete = True
    except EmbeddingsError as pending_shards:
        logger.info("rank %d done; %s", rank, pending_shards)
    if skipped:
        logger.warning("skipped %d undecodable sample(s); see %s/done/*.json for their keys", skipped, output_dir)
    return {
        "output": str(Path(output_dir).resolve()),
        "rank": rank,
        "world_size": world_size,
        "shards": len(mine),
        "written": written,
        "skipped": skipped,
        "seconds": round(seconds, 3),
        "images_per_second": round(written / seconds, 1) if seconds > 0 else None,
        "encoder": encoder.describe(),
        "precision": encoder.precision,
        "provider": encoder.provider,
        "providers": encoder.providers,
        "complete": complete,
    }


def _run(encoder: Encoder, pool, workers: int, plan: Sequence[str], mine: Sequence[int], classes: Sequence[str],
         output_dir, batch_size: int, chunk_size: int, progress: bool, rank: int, world_size: int) -> tuple[int, int]:
    """Decode (in ``pool``, bounded prefetch, in order), encode and write this process's shards;
    returns (embeddings written, samples skipped)."""
    from tqdm import tqdm

    spec, input_format = encoder.preprocess.to_dict(), encoder.input_format
    written = skipped = 0
    chunk = _Chunk()
    shard_skipped, shard_keys = 0, []
    total = _shard_totals(plan, mine)
    in_flight: collections.deque = collections.deque()
    units = _units(plan, mine, batch_size, chunk_size, set(part_names(output_dir)))
    prefetch = 2 * max(1, workers) + 1
    with tqdm(total=total, unit="img", desc=f"extract {rank}/{world_size}" if world_size > 1 else "extract",
              disable=not progress, file=sys.stderr, position=rank if world_size > 1 else None) as bar:
        exhausted, deferred = False, None
        while True:
            while not exhausted and len(in_flight) < prefetch:
                try:
                    unit = next(units, None)
                except ValueError as error:  # a broken shard: finish what was read before it, then report
                    unit, deferred = None, error
                if unit is None:
                    exhausted = True
                    break
                payloads = [sample.image for sample in unit.samples]
                in_flight.append((unit, pool.apply_async(decode_batch, (payloads, spec, input_format))))
            if not in_flight:
                break
            unit, pending = in_flight.popleft()
            batch, errors = pending.get()
            if len(batch):
                chunk.vectors.append(encoder.encode_batch(batch, batch_size))
            url = plan[unit.shard_index]
            for sample, error in zip(unit.samples, errors):
                if error is not None:
                    chunk.skipped += 1
                    shard_skipped += 1
                    if len(chunk.skipped_keys) < MAX_REPORTED_KEYS:
                        chunk.skipped_keys.append(sample.key)
                    if len(shard_keys) < MAX_REPORTED_KEYS:
                        shard_keys.append(sample.key)
                        logger.warning("skipping %s in %s: %s", sample.key, url, error)
                    continue
                chunk.ids.append(int(sample.sample_id))
                chunk.keys.append(sample.key)
                chunk.shards.append(url)
                chunk.labels.append(int(sample.label))
                chunk.label_names.append(_label_name(sample.label, classes))
                chunk.captions.append(sample.caption)
            bar.update(len(unit.samples))
            if unit.chunk_end:
                written += _write_chunk(output_dir, unit, chunk, encoder.dim)
                chunk = _Chunk()
            if unit.shard_end:
                skipped += shard_skipped
                _finish_shard(output_dir, unit.shard_index, url, shard_keys)
                shard_skipped, shard_keys = 0, []
    if deferred is not None:
        raise deferred
    return written, skipped


def _write_chunk(output_dir, unit: _Unit, chunk: _Chunk, dim: int) -> int:
    vectors = np.concatenate(chunk.vectors) if chunk.vectors else np.zeros((0, dim), dtype=np.float32)
    table = metadata_table(chunk.ids, chunk.keys, chunk.shards, chunk.labels, chunk.label_names, chunk.captions)
    write_part(output_dir, part_name(unit.shard_index, unit.chunk), vectors, table,
               info={"skipped": chunk.skipped, "skipped_keys": chunk.skipped_keys})
    return len(vectors)


def _finish_shard(output_dir, shard_index: int, url: str, keys: list[str]) -> None:
    """Write the shard's done record, counting over all its parts (including ones from an earlier run)."""
    prefix = f"{shard_index:06d}-"
    names = [name for name in part_names(output_dir) if name.startswith(prefix)]
    skipped = sum(int(part_info(output_dir, name).get("skipped", 0)) for name in names)
    written = sum(part_rows(output_dir, name) for name in names)
    mark_shard_done(output_dir, shard_index, {
        "shard": url, "parts": len(names), "written": written, "skipped": skipped, "skipped_keys": keys,
    })
    if skipped:
        logger.warning("%s: skipped %d undecodable sample(s)", url, skipped)


# -- command line -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export.extract", description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", required=True, help="exported encoder directory (RUN/onnx)")
    parser.add_argument("--data", required=True, help="shard spec: brace pattern, glob, directory, or '::'-joined")
    parser.add_argument("--output", required=True, help="embeddings directory to write (resumes if it exists)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per encoder call (default 64)")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="stored dtype")
    parser.add_argument("--workers", type=int, default=None, help="decode processes (default: cores - 1, max 8; 0: none)")
    parser.add_argument("--chunk-size", type=int, default=8192, help="samples per part file (the resume unit)")
    parser.add_argument("--precision", choices=["auto", "fp32", "fp16", "int8"], default="auto",
                        help="encoder variant (auto: fp16 on a GPU, int8 on a CPU, when exported; else fp32)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; prints a JSON summary and returns the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = extract(args.encoder, args.data, args.output, batch_size=args.batch_size, dtype=args.dtype,
                          workers=args.workers, chunk_size=args.chunk_size, precision=args.precision,
                          threads=args.threads, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, EncoderError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary["info"] = {k: v for k, v in embeddings_info(args.output).items() if k not in ("encoder", "shards")}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
