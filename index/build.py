"""Build a FAISS index over a shard set's image embeddings (or extracted embeddings), tuned for recall.

    python -m index.build --encoder RUN/onnx --data 'SHARDS/test-*.tar.gz' --output RUN/index
    python -m index.build --embeddings RUN/emb --output RUN/index [--max-memory 8G] [--index FACTORY]
        [--target-recall 0.95] [--confidence 0.95] [--recall-k 10] [--query-batch 1] [--train-size N] [--cpu]
        [--precision auto|fp32|fp16|int8]
    python -m index.build --engine ray [--address auto|HOST:PORT] --embeddings EMB --output RUN/index \
        [--num-parts N] [--on-disk] [--index IVF_FACTORY] [--max-index-size 40G | --num-indexes N]
                                                               # see index/ray_build.py

The index type comes from ``index.select.choose_index`` (Flat -> HNSW32 -> IVF<n>,Flat ->
OPQ<m>,IVF<n>,PQ<m> as the collection outgrows ``--max-memory``; for searches of many queries per call,
``--query-batch`` >= 64, fast-scan IVF-PQ with exact re-ranking, ``PCA<p>,IVF<n>,PQ<p>x4fs,RFlat``) unless
``--index`` names a faiss factory string. IVF indexes are trained on a random sample; then ``nprobe`` /
``efSearch`` (and ``k_factor_rf``, the re-ranking depth of ``,RFlat`` indexes) are raised until a one-sided
``--confidence`` lower bound on recall@k against exact search on held-out queries reaches
``--target-recall`` (``index.tune.recall_lower_bound``: the recorded recall then holds on new queries, not
only on the tuning sample; ``--confidence 0`` compares the sample mean instead). The held-out queries are
up to 1000 stored vectors (a tenth of a small collection) that join the index only after tuning. Speeds
are timed ``--query-batch`` queries per call. With GPUs, training, adding and tuning run there
(``index.devices``).

Writes, into ``--output`` (``index.store``): ``index.json`` (factory, metric, dim, count, choice reason,
query batch, training sample size, tuned search parameters, achieved recall with its lower bound, method
and confidence under ``recall``, latency, build times, encoder
identity: directory, fingerprint, ``encoder_variant`` and ``encoder_provider``) naming ``index-<gen>.faiss`` and ``metadata-<gen>.parquet`` (id, key, shard, label,
label_name, caption). Embeddings are L2-normalised: inner product is cosine similarity. No torch.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import sys
import time
from typing import Any, Sequence

import numpy as np

from export.contract import describe_execution
from index import devices
from index.construct import METRIC, gather_rows, new_index, resolve_choice, uncentre_projections
from index.duplicates import duplicates_message
from index.merge import add_set_options, set_size_limit
from index.select import default_max_memory, parse_memory
from index.sources import ArraySource, EmbeddingsSource, ShardSource
from index.store import commit, writer_lock
from index.tune import DEFAULT_CONFIDENCE, exact_neighbours, tune

logger = logging.getLogger(__name__)

DEFAULT_RECALL_K = 10
DEFAULT_TARGET_RECALL = 0.95
TUNE_QUERIES = 1000
MIN_TUNE_COUNT = 20  # smaller collections are exact anyway; nothing to tune


def _id_blocks(source: Any):
    for vectors, table in source.blocks():
        yield vectors, table.column("id").to_numpy()


def build_from_source(
    source: Any,
    output_dir: str | os.PathLike | None,
    factory: str | None = None,
    max_memory: int | None = None,
    target_recall: float = DEFAULT_TARGET_RECALL,
    recall_k: int | None = None,
    tune_queries: int = TUNE_QUERIES,
    train_size: int | None = None,
    use_gpu: bool | None = None,
    seed: int = 0,
    confidence: float | None = DEFAULT_CONFIDENCE,
    query_batch: int = 1,
) -> tuple[dict, Any]:
    """Choose, train, fill, tune and (unless ``output_dir`` is None) write an index; ``(info, cpu_index)``.

    ``confidence``: the tuned recall must hold as a one-sided lower bound at this level (None: the sample
    mean); ``query_batch``: queries per search call the index is meant for (choice and timing).
    """
    import pyarrow as pa

    started = time.perf_counter()
    count, dim = int(source.count), int(source.dim)
    if count < 1:
        raise ValueError("empty collection: there is nothing to index")
    if recall_k is not None and recall_k >= count:
        raise ValueError(f"--recall-k {recall_k} must be smaller than the collection ({count} vectors)")
    if query_batch < 1:
        raise ValueError(f"--query-batch must be at least 1, got {query_batch}")
    budget = default_max_memory() if max_memory is None else int(max_memory)
    choice = resolve_choice(count, dim, factory, budget, query_batch)
    cpu_index = new_index(dim, choice.factory)
    rng = np.random.default_rng(seed)
    order = rng.permutation(count)
    train_count = 0 if cpu_index.is_trained else min(count, int(train_size or choice.train_size or count))
    # Held-out queries: added to the index only after tuning, so they are never their own neighbours
    # (nor graph nodes next to them); taken from outside the training sample when the collection allows.
    query_count = 0 if count < MIN_TUNE_COUNT else min(tune_queries, count // 10)
    k = min(recall_k or DEFAULT_RECALL_K, count - query_count)
    query_rows = order[train_count: train_count + query_count] if train_count + query_count <= count else order[:query_count]
    train_vectors, _ = gather_rows(source, order[:train_count]) if train_count else (None, None)
    queries, query_ids = gather_rows(source, query_rows)

    timings = {}
    tick = time.perf_counter()
    if not cpu_index.is_trained:
        logger.info("training %s on %d vectors", choice.factory, train_count)
        try:
            uncentre_projections(cpu_index, train_vectors)
            cpu_index = devices.train(cpu_index, train_vectors, use_gpu)
        except RuntimeError as error:
            raise ValueError(f"training {choice.factory!r} on {train_count} vectors failed: {str(error).strip()}") from error
    timings["train_seconds"] = round(time.perf_counter() - tick, 3)

    tick = time.perf_counter()
    index, keep_alive = devices.to_gpu(cpu_index, use_gpu)
    tables, all_ids = [], []
    for vectors, table in source.blocks():
        if vectors.shape[1] != dim:
            raise ValueError(f"a block of {vectors.shape[1]}-dimensional vectors in a {dim}-dimensional collection")
        ids = table.column("id").to_numpy().astype(np.int64)
        indexed = ~np.isin(ids, query_ids)
        index.add_with_ids(np.ascontiguousarray(vectors[indexed], dtype=np.float32), ids[indexed])
        tables.append(table)
        all_ids.append(ids)
    ids = np.concatenate(all_ids)
    unique, counts = np.unique(ids, return_counts=True)
    if len(unique) != len(ids):
        raise ValueError(duplicates_message(tables))
    timings["add_seconds"] = round(time.perf_counter() - tick, 3)

    tick = time.perf_counter()
    if query_count:
        blocks = ((vectors[keep], ids[keep]) for vectors, ids in _id_blocks(source) for keep in [~np.isin(ids, query_ids)])
        truth = exact_neighbours(queries, blocks, k)
        limit = min(choice.nlist, devices.GPU_MAX_NPROBE) if keep_alive is not None else choice.nlist
        tuning = tune(index, choice.family, queries, truth.ids, k, target_recall, nlist=limit, confidence=confidence,
                      batch_size=query_batch)
        index.add_with_ids(queries, query_ids)
    else:
        tuning = {"params": {}, "recall": None, "lower_bound": None, "k": 0, "queries": 0, "target": target_recall,
                  "reached": False}
    if not tuning.get("reached", True) and query_count:
        logger.warning("recall@%d %.3f (lower bound %s) is below the target %.3f at %s", k, tuning["recall"],
                       tuning.get("lower_bound"), target_recall, tuning["params"])
    timings["tune_seconds"] = round(time.perf_counter() - tick, 3)
    cpu_index = devices.to_cpu(index, keep_alive)
    info = {
        "factory": choice.factory,
        "family": choice.family,
        "metric": METRIC,
        "dim": dim,
        "count": int(cpu_index.ntotal),
        "count_at_build": int(cpu_index.ntotal),
        "choice": {"reason": choice.reason, "estimated_bytes": choice.estimated_bytes, "max_memory": budget},
        "query_batch": int(query_batch),
        "train_size": train_count,
        "search_params": tuning["params"],
        "recall": tuning,
        "device": f"gpu x{devices.use_gpus(use_gpu)}" if keep_alive is not None else "cpu",
        **source.describe(),
        **timings,
        "build_seconds": round(time.perf_counter() - started, 3),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if output_dir is not None:
        with writer_lock(output_dir):
            info = commit(output_dir, cpu_index, pa.concat_tables(tables), info)
        logger.info("wrote %d vectors (dim %d, %s) to %s", info["count"], dim, choice.factory, output_dir)
    return info, cpu_index


def build_index(
    encoder_dir: str | os.PathLike | None,
    data_spec: str | list[str] | None,
    output_dir: str | os.PathLike,
    batch_size: int = 256,
    limit: int | None = None,
    progress: bool = True,
    use_gpu: bool | None = None,
    *,
    embeddings: str | os.PathLike | None = None,
    factory: str | None = None,
    max_memory: int | str | None = None,
    target_recall: float = DEFAULT_TARGET_RECALL,
    recall_k: int | None = None,
    train_size: int | None = None,
    precision: str = "auto",
    confidence: float | None = DEFAULT_CONFIDENCE,
    query_batch: int = 1,
) -> dict:
    """Embed ``data_spec`` through ``encoder_dir`` (or read ``embeddings``) and write a tuned index.

    ``precision`` picks the encoder variant (``export.runtime.Encoder``; auto: fp16 on a GPU, int8 on a
    CPU, when exported); ``index.json`` records it (``encoder_variant``, ``encoder_provider``), for
    ``embeddings`` as ``export.extract`` recorded it.
    Returns the ``index.json`` dictionary. Raises ``ShardPatternError`` when the spec names no shard,
    ``FileNotFoundError``/``EncoderError`` for an unusable encoder directory, ``ValueError`` for an empty
    collection, colliding ids, a bad factory string or a collection that cannot fit ``max_memory``.
    """
    if embeddings is not None:
        source: Any = EmbeddingsSource(embeddings)
        described = source.describe()
        logger.info("indexing embeddings made by the %s (%s)", describe_execution(
            described.get("encoder_variant"), described.get("encoder_provider")), described.get("encoder"))
    elif encoder_dir is None or data_spec is None:
        raise ValueError("give --encoder and --data, or --embeddings")
    else:
        source = ShardSource(encoder_dir, data_spec, batch_size=batch_size, limit=limit, progress=progress,
                             precision=precision)
    if isinstance(max_memory, str):
        max_memory = parse_memory(max_memory)
    info, _ = build_from_source(source, output_dir, factory=factory, max_memory=max_memory, target_recall=target_recall,
                                recall_k=recall_k, train_size=train_size, use_gpu=use_gpu, confidence=confidence,
                                query_batch=query_batch)
    return info


def build_arrays(vectors: np.ndarray, output_dir: str | os.PathLike | None, ids: np.ndarray | None = None, **kwargs: Any) -> tuple[dict, Any]:
    """``build_from_source`` over in-memory vectors (tests, benchmarks)."""
    return build_from_source(ArraySource(vectors, ids), output_dir, **kwargs)


# -- command line -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m index.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", help="exported encoder directory (RUN/onnx), with --data")
    parser.add_argument("--data", help="shard spec: brace pattern, glob, directory, or '::'-joined")
    parser.add_argument("--embeddings", help="embeddings directory from export.extract (instead of --encoder/--data)")
    parser.add_argument("--output", required=True, help="index directory to write (RUN/index)")
    parser.add_argument("--index", dest="factory", help="faiss factory string, e.g. 'IVF4096,Flat' (default: chosen)")
    parser.add_argument("--max-memory", help="memory budget for the index, e.g. 8G (default: half the RAM)")
    parser.add_argument("--target-recall", type=float, default=DEFAULT_TARGET_RECALL, help="recall@k to tune for (0.95)")
    parser.add_argument("--confidence", type=float, default=DEFAULT_CONFIDENCE,
                        help="the target must hold as a one-sided lower bound at this level (0.95; 0: sample mean)")
    parser.add_argument("--recall-k", type=int, default=None, help="k of the tuned recall (default 10)")
    parser.add_argument("--query-batch", type=int, default=1,
                        help="queries per search call the index serves (1: the app; >= 64 favours fast-scan PQ)")
    parser.add_argument("--train-size", type=int, default=None, help="training sample size (default: from the index)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per encoder call (default 256)")
    parser.add_argument("--limit", type=int, default=None, help="index at most this many images")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--cpu", action="store_true", help="keep FAISS on the CPU even if a GPU is present")
    parser.add_argument("--precision", choices=["auto", "fp32", "fp16", "int8"], default="auto",
                        help="encoder variant with --encoder (auto: fp16 on a GPU, int8 on a CPU, when exported)")
    parser.add_argument("--engine", choices=["local", "ray"], default="local",
                        help="ray: train once, fill parts as Ray tasks, merge (needs --embeddings; an IVF index)")
    parser.add_argument("--address", default=None,
                        help="--engine ray: 'auto' or HOST:PORT of the cluster (default: RAY_ADDRESS, else local)")
    parser.add_argument("--num-parts", type=int, default=None,
                        help="--engine ray: parts filled in parallel (default: the cluster's CPUs or GPUs)")
    parser.add_argument("--on-disk", action="store_true",
                        help="--engine ray: merge the inverted lists into one memory-mapped file (larger than RAM)")
    add_set_options(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; prints index.json and returns the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.embeddings is None and (args.encoder is None or args.data is None):
        print("error: give --encoder and --data, or --embeddings", file=sys.stderr)
        return 2
    if args.engine == "ray":
        return _main_ray(args)
    if args.num_indexes != 1 or args.max_index_size:
        print("error: --num-indexes / --max-index-size merge parts into a set of indexes: use --engine ray, or "
              "`python -m index.merge` (train, add, merge)", file=sys.stderr)
        return 2
    try:
        info = build_index(
            args.encoder, args.data, args.output, batch_size=args.batch_size, limit=args.limit,
            progress=not args.no_progress, use_gpu=False if args.cpu else None, embeddings=args.embeddings,
            factory=args.factory, max_memory=args.max_memory, target_recall=args.target_recall,
            recall_k=args.recall_k, train_size=args.train_size, precision=args.precision,
            confidence=args.confidence or None, query_batch=args.query_batch,
        )
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({key: value for key, value in info.items() if key != "recall"} | {
        "recall": {key: value for key, value in info["recall"].items() if key != "curve"}}, indent=2))
    return 0


def _main_ray(args: argparse.Namespace) -> int:
    """``--engine ray`` (``index.ray_build.build_ray``): train once, fill parts as Ray tasks, merge."""
    from index.ray_build import build_ray

    if args.embeddings is None:
        print("error: --engine ray builds from extracted embeddings: run `python -m export.extract --engine ray "
              "--encoder ... --data ... --output EMB` first, then pass --embeddings EMB", file=sys.stderr)
        return 2
    try:
        info = build_ray(args.embeddings, args.output, factory=args.factory,
                         max_memory=parse_memory(args.max_memory) if args.max_memory else None,
                         num_parts=args.num_parts, on_disk=args.on_disk, address=args.address,
                         num_indexes=args.num_indexes, max_index_size=set_size_limit(args),
                         target_recall=args.target_recall, recall_k=args.recall_k or DEFAULT_RECALL_K,
                         train_size=args.train_size, use_gpu=False if args.cpu else None)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({key: value for key, value in info.items() if key not in ("recall", "shards", "skipped_keys")},
                     indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
