"""Build one IVF index from many machines: train once, fill parts independently, merge.

    # 1. embeddings per shard, in parallel (export.extract under accelerate launch), then:
    python -m index.merge train --embeddings EMB --parts PARTS [--index 'IVF65536_HNSW32,Flat'] [--max-memory 64G]
    # 2. any number of processes / machines, each on its slice of EMB's parts:
    python -m index.merge add --embeddings EMB --parts PARTS --part 3 --num-parts 16
    # 3. one machine: merge in RAM, or on disk (inverted lists memory-mapped, larger than RAM), into one index
    #    or, when one would not fit a serving machine, a set of member indexes searched as one
    python -m index.merge merge --parts PARTS --output RUN/index [--on-disk] [--tune-queries 1000]
        [--max-index-size 40G | --num-indexes N]

``PARTS/trained.faiss`` is the empty index with its coarse quantizer (and PQ / OPQ) trained on a
random sample; ``PARTS/plan.json`` records the factory, dim, sample size and the embeddings. Each
``part-<i>-of-<n>.faiss`` holds the vectors of EMB parts ``i, i+n, i+2n, ...`` with their ids, and
``part-<i>-of-<n>.parquet`` their metadata. Merging uses FAISS's own ``merge_from`` (RAM) or
``OnDiskInvertedLists`` (``faiss.contrib.ondisk.merge_ondisk``); the result is an ordinary index
directory (``index.store``) that ``index.search.Index.load`` maps from disk. The training sample is the
one ``index.build`` takes with the same seed (and ``PCA`` transforms are trained the same way), so a build
in parts equals the single-machine build of the same factory. Only IVF factories merge: flat and HNSW have
no inverted lists (refused with the reason). An IVF index with exact re-ranking (``,RFlat``, the batched-search
choice) merges in RAM: its inverted lists, its re-ranking store and its id map are joined part by part
(``merge_into``); not ``--on-disk``, since the re-ranking store is one array in RAM.
``python -m index.build --engine ray`` (``index/ray_build.py``) runs these three steps on a Ray cluster. No torch.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from index import devices
from index.duplicates import duplicates_message
from index.construct import METRIC, gather_rows, new_index, resolve_choice, uncentre_projections
from index.select import choose_index, nlist_for, quantizer_for, train_size_for
from index.sources import EmbeddingsSource
from index.store import (commit, commit_set, data_files, member_name, next_generation, read_faiss, read_info,
                         update_info, writer_lock)
from index.tune import drop_self, exact_neighbours, tune
from trainer.data import storage

logger = logging.getLogger(__name__)

TRAINED_FILE = "trained.faiss"
PLAN_FILE = "plan.json"


def train(embeddings: str | os.PathLike, parts_dir: str | os.PathLike, factory: str | None = None,
          max_memory: int | None = None, train_size: int | None = None, use_gpu: bool | None = None,
          seed: int = 0) -> dict:
    """Train the shared quantizer on a random sample of ``embeddings``; writes ``trained.faiss`` + ``plan.json``."""
    import faiss

    source = EmbeddingsSource(embeddings)
    if factory is None:
        choice = choose_index(source.count, source.dim, max_memory)
        if choice.family in ("flat", "hnsw"):  # parts can only be merged through inverted lists
            nlist = nlist_for(source.count)
            factory = f"{quantizer_for(nlist)},Flat"
        else:
            factory = choice.factory
    choice = resolve_choice(source.count, source.dim, factory, max_memory)
    index = check_mergeable(new_index(source.dim, factory), factory)
    count = min(source.count, int(train_size or choice.train_size or train_size_for("ivf", source.count, choice.nlist)))
    # The same sample as index.build with this seed (the head of one permutation), so a build in parts trains
    # the same quantizer as the single-machine build and finds the same neighbours.
    rows = np.random.default_rng(seed).permutation(source.count)[:count]
    started = time.perf_counter()
    sample, _ = gather_rows(source, rows)
    uncentre_projections(index, sample)
    index = devices.train(index, sample, use_gpu)
    output = Path(parts_dir)
    output.mkdir(parents=True, exist_ok=True)
    storage.replace_local(output / TRAINED_FILE, lambda name: faiss.write_index(index, name))
    plan = {"factory": factory, "family": choice.family, "dim": source.dim, "count": source.count,
            "nlist": choice.nlist, "train_size": count, "train_seconds": round(time.perf_counter() - started, 3),
            "embeddings": source.path, "encoder_fingerprint": source.fingerprint, "describe": source.describe()}
    storage.replace_local(output / PLAN_FILE, lambda name: Path(name).write_text(json.dumps(plan, indent=2) + "\n"))
    return plan


def refines(index: Any) -> Any:
    """The ``IndexRefine`` inside an ``,RFlat`` index (behind its id map), else None."""
    import faiss

    outer = faiss.downcast_index(index)
    if isinstance(outer, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        inner = faiss.downcast_index(outer.index)
        return inner if isinstance(inner, faiss.IndexRefine) else None
    return None


def check_mergeable(index: Any, factory: str) -> Any:
    """``index`` when its parts can be merged (an IVF index, possibly with ``,RFlat`` re-ranking), else
    ``ValueError``: flat and HNSW have no inverted lists."""
    import faiss

    refine = refines(index)
    core = refine.base_index if refine is not None else index
    if refine is None and isinstance(faiss.downcast_index(index), (faiss.IndexIDMap, faiss.IndexIDMap2)):
        raise ValueError(f"{factory!r} keeps its ids outside inverted lists; only IVF indexes can be built in parts "
                         "and merged")
    try:
        faiss.extract_index_ivf(core)
    except RuntimeError as error:
        raise ValueError(f"{factory!r} has no inverted lists; only IVF indexes can be built in parts "
                         "and merged") from error
    return index


def check_on_disk(factory: str, on_disk: bool) -> None:
    """``ValueError`` for an on-disk merge of a re-ranking (``,RFlat``) factory."""
    if on_disk and "RFlat" in factory:
        raise ValueError(f"{factory!r} re-ranks from a store of every full vector, which stays in RAM: merge it "
                         "without --on-disk (or drop ',RFlat' for on-disk inverted lists)")


def merge_into(target: Any, part: Any) -> None:
    """Merge the filled ``part`` into ``target`` (both copies of one trained index): ``merge_from`` for IVF; for
    ``,RFlat`` the inverted lists (the part's internal ids shifted past the target's), the re-ranking store and the
    id map, joined in the same order, which faiss's own ``merge_from`` does not do through the id map."""
    import faiss

    refine, other = refines(target), refines(part)
    if refine is None:
        target.merge_from(part, 0)
        return
    offset = int(refine.ntotal)
    faiss.extract_index_ivf(refine.base_index).merge_from(faiss.extract_index_ivf(other.base_index), offset)
    faiss.downcast_index(refine.refine_index).merge_from(faiss.downcast_index(other.refine_index), 0)
    total = offset + int(other.ntotal)
    base = faiss.downcast_index(refine.base_index)
    while not isinstance(base, faiss.IndexIVF):  # pre-transform wrappers (PCA) count the vectors too
        base.ntotal = total
        base = faiss.downcast_index(base.index)
    refine.ntotal = total
    outer, other_outer = faiss.downcast_index(target), faiss.downcast_index(part)
    ids = np.concatenate([faiss.vector_to_array(outer.id_map), faiss.vector_to_array(other_outer.id_map)])
    faiss.copy_array_to_vector(ids.astype(np.int64), outer.id_map)
    outer.ntotal = total
    if isinstance(outer, faiss.IndexIDMap2):
        outer.construct_rev_map()


def read_plan(parts_dir: str | os.PathLike) -> dict:
    path = Path(parts_dir) / PLAN_FILE
    if not path.is_file() or not (Path(parts_dir) / TRAINED_FILE).is_file():
        raise FileNotFoundError(f"{parts_dir} has no {PLAN_FILE}/{TRAINED_FILE}; "
                                "run `python -m index.merge train` first")
    return json.loads(path.read_text())


def add_part(parts_dir: str | os.PathLike, part: int, num_parts: int, embeddings: str | os.PathLike | None = None,
             use_gpu: bool | None = None) -> dict:
    """Fill a copy of the trained index with EMB parts ``part, part + num_parts, ...``; writes ``part-<i>-of-<n>``."""
    import faiss

    if not 0 <= part < num_parts:
        raise ValueError(f"--part must be in [0, {num_parts}), got {part}")
    plan = read_plan(parts_dir)
    index = faiss.read_index(str(Path(parts_dir) / TRAINED_FILE))
    index, table = fill_part(index, int(plan["dim"]), str(embeddings or plan["embeddings"]), part, num_parts, use_gpu)
    return write_part(parts_dir, part, num_parts, index, table)


def fill_part(trained: Any, dim: int, embeddings: str, part: int, num_parts: int,
              use_gpu: bool | None = None) -> tuple[Any, Any]:
    """``(cpu index, metadata table)``: ``trained`` (consumed) filled with EMB parts ``part, part + num_parts, ...``.

    Needs only the embeddings, not the parts directory (``index.ray_build`` runs it on other machines)."""
    import pyarrow as pa
    from export.embeddings import METADATA_COLUMNS, part_names, read_part

    index, keep_alive = devices.to_gpu(trained, use_gpu)
    tables = []
    for name in part_names(embeddings)[part::num_parts]:
        vectors, table = read_part(embeddings, name)
        if vectors.shape[1] != dim:
            raise ValueError(f"dimension mismatch: part {name} is {vectors.shape[1]}-d, the trained index {dim}-d")
        index.add_with_ids(vectors, table.column("id").to_numpy().astype(np.int64))
        tables.append(table.select(list(METADATA_COLUMNS)))
    table = pa.concat_tables(tables) if tables else pa.table({c: [] for c in METADATA_COLUMNS})
    return devices.to_cpu(index, keep_alive), table


def write_part(parts_dir: str | os.PathLike, part: int, num_parts: int, index: Any, table: Any) -> dict:
    """Write ``part-<i>-of-<n>.parquet`` then ``.faiss`` (the part's commit point) into ``parts_dir``."""
    import faiss
    import pyarrow.parquet as pq

    stem = Path(parts_dir) / f"part-{part:05d}-of-{num_parts:05d}"
    storage.replace_local(stem.with_suffix(".parquet"), lambda name: pq.write_table(table, name))
    storage.replace_local(stem.with_suffix(".faiss"), lambda name: faiss.write_index(index, name))
    return {"part": part, "num_parts": num_parts, "count": int(index.ntotal), "file": str(stem.with_suffix(".faiss"))}


def merge(parts_dir: str | os.PathLike, output_dir: str | os.PathLike, on_disk: bool = False,
          target_recall: float = 0.95, recall_k: int = 10, tune_queries: int = 1000, seed: int = 0,
          num_indexes: int = 1, max_index_size: int | None = None) -> dict:
    """Merge every ``part-*.faiss`` of ``parts_dir`` into one index directory; tunes ``nprobe`` against exact
    search over the plan's embeddings (a full scan per query batch; ``tune_queries=0`` skips it).

    When one index would not fit (``max_index_size`` bytes, estimated from the filled parts), or with
    ``num_indexes`` > 1, the parts are merged into a *set* of member indexes instead (``index.store``): each an
    ordinary index directory of about equal size, all sharing the trained quantizer, tuned together, and
    loaded by ``Index.load`` as one index that searches every member."""
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    plan = read_plan(parts_dir)
    check_on_disk(plan["factory"], on_disk)
    part_files = complete_parts(parts_dir)
    started = time.perf_counter()
    part_tables = {part: pq.read_table(str(part.with_suffix(".parquet"))) for part in part_files}
    table = pa.concat_tables(part_tables.values())
    ids = table.column("id").to_numpy()
    if len(np.unique(ids)) != len(ids):
        raise ValueError(duplicates_message([table], " across parts"))
    trained_file = Path(parts_dir) / TRAINED_FILE
    groups = split_parts(part_files, indexes_needed(part_files, trained_file, num_indexes, max_index_size))
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    with writer_lock(output):
        previous = read_info(output) if (output / "index.json").is_file() else None
        generation = next_generation(previous)
        if len(groups) == 1:
            index, lists = _merged(trained_file, part_files, output, generation, on_disk)
            tuning = _tuning(index, plan, tune_queries, recall_k, target_recall, seed)
            info = _merged_info(plan, index, tuning, len(part_files), on_disk, started)
            return commit(output, index, table, info, generation=generation, extra_files=lists)
        names = []
        for number, group in enumerate(groups):  # one member in memory at a time
            name = member_name(generation, number, len(groups))
            member_dir = output / name
            member_dir.mkdir()
            index, lists = _merged(trained_file, group, member_dir, generation, on_disk)
            member_table = pa.concat_tables([part_tables[part] for part in group])
            info = _merged_info(plan, index, None, len(group), on_disk, started)
            commit(member_dir, index, member_table, {**info, "set_member": [number, len(groups)]},
                   generation=generation, extra_files=lists)
            names.append(name)
            del index
            logger.info("merged member %d of %d: %d vectors from %d part(s)", number + 1, len(groups),
                        member_table.num_rows, len(group))
        members = faiss.IndexShards(int(plan["dim"]), True, False)
        for name in names:  # tuned as served: every member searched, merged by score (mapped, not read)
            member_dir = output / name
            members.add_shard(read_faiss(data_files(member_dir, read_info(member_dir))["index"], mmap=True,
                                         family=plan["family"], on_disk=on_disk))
        tuning = _tuning(members, plan, tune_queries, recall_k, target_recall, seed)
        for name in names:  # a member served alone probes as many lists as the set
            update_info(output / name, {"search_params": tuning["params"]})
        info = _merged_info(plan, members, tuning, len(part_files), on_disk, started)
        return commit_set(output, names, info)


def complete_parts(parts_dir: str | os.PathLike) -> list[Path]:
    """The ``part-*.faiss`` files of one complete split, in order (errors name what is missing)."""
    part_files = sorted(Path(parts_dir).glob("part-*-of-*.faiss"))
    if not part_files:
        raise FileNotFoundError(f"{parts_dir} holds no part-*.faiss; run `python -m index.merge add` first")
    totals = {name.name.split("-of-")[1] for name in part_files}
    if len(totals) != 1 or len(part_files) != int(next(iter(totals)).split(".")[0]):
        raise ValueError(f"{parts_dir} holds {len(part_files)} part file(s) of differing or incomplete splits: "
                         f"{[p.name for p in part_files][:4]}...")
    return part_files


def indexes_needed(part_files: Sequence[Path], trained_file: Path, num_indexes: int = 1,
                   max_index_size: int | None = None) -> int:
    """How many member indexes the parts merge into: ``num_indexes``, or with ``max_index_size`` (bytes) the
    fewest whose estimated size fits it (the parts' sizes, each less the trained index it repeats)."""
    if num_indexes < 1:
        raise ValueError(f"--num-indexes must be at least 1, got {num_indexes}")
    count = num_indexes
    if max_index_size is not None:
        overhead = trained_file.stat().st_size
        sizes = [max(0, p.stat().st_size - overhead) for p in part_files]
        largest = max(sizes)
        if overhead + largest > max_index_size:
            raise ValueError(f"one filled part alone needs about {_gib(overhead + largest)} (its quantizer "
                             f"{_gib(overhead)}), more than --max-index-size {_gib(max_index_size)}; fill more, "
                             "smaller parts (--num-parts) or raise the limit")
        count = max(count, -(-sum(sizes) // max(1, max_index_size - overhead)))
        while count < len(part_files) and max(_group_sizes(sizes, count)) + overhead > max_index_size:
            count += 1  # parts do not split evenly: one more member until the largest fits
    if count > len(part_files):
        raise ValueError(f"{count} indexes need at least {count} filled parts, and there are {len(part_files)}; "
                         "fill more parts (--num-parts)")
    return count


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


def _group_sizes(sizes: Sequence[int], count: int) -> list[int]:
    return [sum(sizes[i] for i in group) for group in _balanced(sizes, count)]


def _balanced(sizes: Sequence[int], count: int) -> list[list[int]]:
    """Positions of ``sizes`` in ``count`` groups of about equal total: largest first into the lightest."""
    groups: list[list[int]] = [[] for _ in range(count)]
    totals = [0] * count
    for position in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        lightest = totals.index(min(totals))
        groups[lightest].append(position)
        totals[lightest] += sizes[position]
    return [sorted(group) for group in groups]


def split_parts(part_files: Sequence[Path], count: int) -> list[list[Path]]:
    """``part_files`` in ``count`` groups of about equal bytes, each in part order."""
    if count == 1:
        return [list(part_files)]
    groups = _balanced([p.stat().st_size for p in part_files], count)
    return [[part_files[i] for i in group] for group in groups]


def _merged(trained_file: Path, part_files: Sequence[Path], output: Path, generation: str,
            on_disk: bool) -> tuple[Any, dict[str, str]]:
    """``(index, extra files)``: the trained index with ``part_files`` merged in, in RAM or with its inverted
    lists in ``output/lists-<generation>.ivfdata`` (memory-mapped)."""
    import faiss
    from faiss.contrib.ondisk import merge_ondisk

    index = faiss.read_index(str(trained_file))
    if on_disk:
        lists = f"lists-{generation}.ivfdata"
        merge_ondisk(index, [str(p) for p in part_files], str(output / lists))
        return index, {"lists": lists}
    for part_file in part_files:
        merge_into(index, faiss.read_index(str(part_file)))
    return index, {}


def _tuning(index: Any, plan: dict, tune_queries: int, recall_k: int, target_recall: float, seed: int) -> dict:
    """``index.tune.tune`` against exact search over the plan's embeddings (skipped when ``tune_queries`` is 0)."""
    if not tune_queries:
        return {"params": {}, "recall": None, "k": recall_k, "queries": 0, "target": target_recall, "reached": False}
    source = EmbeddingsSource(plan["embeddings"])
    query_rows = np.random.default_rng(seed).choice(source.count, size=min(tune_queries, source.count),
                                                    replace=False)
    queries, query_ids = gather_rows(source, query_rows)
    blocks = ((v, t.column("id").to_numpy()) for v, t in source.blocks())
    truth = drop_self(exact_neighbours(queries, blocks, recall_k + 1).ids, query_ids, recall_k)
    return tune(index, plan["family"], queries, truth, recall_k, target_recall, exclude=query_ids,
                nlist=plan["nlist"])


def _merged_info(plan: dict, index: Any, tuning: dict | None, parts: int, on_disk: bool, started: float) -> dict:
    tuning = tuning or {"params": {}, "recall": None, "queries": 0, "reached": False, "note": "tuned with its set"}
    return {
        "factory": plan["factory"], "family": plan["family"], "metric": METRIC, "dim": int(index.d),
        "count": int(index.ntotal), "count_at_build": int(index.ntotal),
        "choice": {"reason": "index.merge of independently built parts", "max_memory": None},
        "train_size": plan["train_size"], "search_params": tuning["params"], "recall": tuning,
        "merged_parts": parts, "on_disk": on_disk, **plan["describe"],
        "encoder_fingerprint": plan.get("encoder_fingerprint"),
        "build_seconds": round(time.perf_counter() - started, 3),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def add_set_options(parser: argparse.ArgumentParser) -> None:
    """``--num-indexes`` / ``--max-index-size``: merge into a set of indexes when one would not fit."""
    parser.add_argument("--num-indexes", type=int, default=1,
                        help="merge into this many member indexes (a set, searched as one; default 1)")
    parser.add_argument("--max-index-size",
                        help="largest member index, e.g. 40G: the parts merge into as many members as it takes")


def set_size_limit(args: argparse.Namespace) -> int | None:
    from index.select import parse_memory

    return parse_memory(args.max_index_size) if args.max_index_size else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m index.merge", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train_cmd = commands.add_parser("train", help="train the shared quantizer on a sample")
    train_cmd.add_argument("--embeddings", required=True)
    train_cmd.add_argument("--parts", required=True, help="working directory for the trained index and the parts")
    train_cmd.add_argument("--index", dest="factory", help="IVF factory string (default: chosen from size and memory)")
    train_cmd.add_argument("--max-memory", help="memory budget of the merged index, e.g. 64G")
    train_cmd.add_argument("--train-size", type=int)
    add_cmd = commands.add_parser("add", help="fill one part")
    add_cmd.add_argument("--parts", required=True)
    add_cmd.add_argument("--part", type=int, required=True)
    add_cmd.add_argument("--num-parts", type=int, required=True)
    add_cmd.add_argument("--embeddings", help="default: the plan's embeddings")
    merge_cmd = commands.add_parser("merge", help="merge all parts into an index directory")
    merge_cmd.add_argument("--parts", required=True)
    merge_cmd.add_argument("--output", required=True)
    merge_cmd.add_argument("--on-disk", action="store_true", help="inverted lists in one memory-mapped file")
    merge_cmd.add_argument("--target-recall", type=float, default=0.95)
    merge_cmd.add_argument("--recall-k", type=int, default=10)
    merge_cmd.add_argument("--tune-queries", type=int, default=1000, help="0 skips tuning (no exact scan)")
    add_set_options(merge_cmd)
    for command in (train_cmd, add_cmd):
        command.add_argument("--cpu", action="store_true", help="keep FAISS on the CPU even if a GPU is present")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "train":
            from index.select import parse_memory

            memory = parse_memory(args.max_memory) if args.max_memory else None
            result: Any = train(args.embeddings, args.parts, args.factory, memory, args.train_size,
                                False if args.cpu else None)
        elif args.command == "add":
            result = add_part(args.parts, args.part, args.num_parts, args.embeddings, False if args.cpu else None)
        else:
            result = merge(args.parts, args.output, args.on_disk, args.target_recall, args.recall_k, args.tune_queries,
                           num_indexes=args.num_indexes, max_index_size=set_size_limit(args))
            result = {key: value for key, value in result.items() if key not in ("recall", "shards", "skipped_keys")}
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
