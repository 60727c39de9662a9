"""Production feature extraction: WebDataset shards -> embeddings with the exported ONNX encoder.

    python -m export.extract --encoder RUN/onnx --data 'SHARDS/*.tar.gz' --output EMB \
        [--batch-size 64] [--dtype float16|float32] [--workers N] [--chunk-size 8192] \
        [--precision auto|fp32|fp16|int8] [--threads N] [--no-progress] \
        [--engine local|ray] [--address auto|HOST:PORT] [--actors N] [--readers N]

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

``--engine ray`` (``export/ray_extract.py``) runs the same per-unit code (``export/extraction.py``) on a
Ray cluster: shards read and decoded by Ray tasks, the encoder in an actor pool (a GPU each where there are
GPUs), parts and done records written by the driver in the same format and names, so either engine resumes
the other's output.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import multiprocessing
import os
import sys
import time
from typing import Sequence

from export.embeddings import EmbeddingsError, done_shards, embeddings_info, finalize, part_names
from export.extraction import (  # noqa: F401  (part_name: a public name of this module before the split)
    Assembler, decode_batch, open_extraction, part_name, plan_shards, plan_units, progress_bar,
)
from export.runtime import Encoder, EncoderError
from trainer.data import storage

logger = logging.getLogger(__name__)


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
    plan, classes = plan_shards(data_spec)
    workers = max(1, min(8, (os.cpu_count() or 2) - 1)) if workers is None else workers
    # Fork the decoders before onnxruntime starts its thread pools (forking a threaded process is unsafe).
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 0 else _InProcess()
    try:
        encoder = Encoder(encoder_dir, precision=precision, threads=threads, device_id=local_rank)
        open_extraction(output_dir, encoder_dir, encoder.precision, encoder.provider, encoder.dim, plan, data_spec,
                        dtype, chunk_size)
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
        "output": storage.describe(output_dir),
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
    spec, input_format = encoder.preprocess.to_dict(), encoder.input_format
    assembler = Assembler(output_dir, plan, classes, encoder.dim)
    in_flight: collections.deque = collections.deque()
    units = plan_units(plan, mine, batch_size, chunk_size, set(part_names(output_dir)))
    prefetch = 2 * max(1, workers) + 1
    with progress_bar(plan, mine, progress, rank, world_size) as bar:
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
            vectors = encoder.encode_batch(batch, batch_size) if len(batch) else None
            assembler.add(unit, errors, vectors)
            bar.update(len(unit.samples))
    if deferred is not None:
        raise deferred
    return assembler.written, assembler.skipped


# -- command line -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export.extract", description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", required=True, help="exported encoder directory (RUN/onnx)")
    parser.add_argument("--data", required=True, help="shard spec: brace pattern, glob, directory, or '::'-joined")
    parser.add_argument("--output", required=True, help="embeddings directory to write (resumes if it exists)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per encoder call (default 64)")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="stored dtype")
    parser.add_argument("--workers", type=int, default=None,
                        help="decode processes of the local engine (default: cores - 1, max 8; 0: none)")
    parser.add_argument("--chunk-size", type=int, default=8192, help="samples per part file (the resume unit)")
    parser.add_argument("--precision", choices=["auto", "fp32", "fp16", "int8"], default="auto",
                        help="encoder variant (auto: fp16 on a GPU, int8 on a CPU, when exported; else fp32)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--engine", choices=["local", "ray"], default="local",
                        help="local: this process (and RANK/WORLD_SIZE launchers); ray: a Ray cluster "
                             "(pip install 'manyview[ray]')")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join with --engine ray: 'auto' (the one started on this node by "
                             "`ray start`) or HOST:PORT (default: RAY_ADDRESS, else a local Ray on this machine)")
    parser.add_argument("--actors", type=int, default=None,
                        help="--engine ray: encoder actors (default: one per GPU, else half the CPUs)")
    parser.add_argument("--readers", type=int, default=None,
                        help="--engine ray: shards read and decoded at once (default: the CPUs the actors leave)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; prints a JSON summary and returns the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.engine == "ray":
            from export.ray_extract import extract_ray

            summary = extract_ray(args.encoder, args.data, args.output, batch_size=args.batch_size, dtype=args.dtype,
                                  chunk_size=args.chunk_size, precision=args.precision, threads=args.threads,
                                  progress=not args.no_progress, address=args.address, actors=args.actors,
                                  readers=args.readers)
        else:
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
