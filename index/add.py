"""Update an index in place: append embeddings with their ids and metadata, or remove ids.

    python -m index.add --index RUN/index --embeddings RUN/emb-new      # export.extract output
    python -m index.add --index RUN/index --remove 17 42 [--remove-file ids.txt]

Adding checks the dimension, the encoder (fingerprint recorded at build time) and that no id is
already indexed; IVF indexes keep their quantizer (trained on the original collection), so a warning
suggests a rebuild once the collection has grown several times. Removal works on CPU indexes
(Flat, IVF by ``remove_ids``; HNSW, whose graph cannot drop nodes, is rebuilt from its stored
vectors). Each update is a new generation (``index.store.commit``): the metadata and the index
change together or not at all, and a crash mid-update leaves the previous index usable. A set of indexes
(``index.merge --num-indexes``) takes new vectors into its smallest member, after checking their ids against
every member, and removes ids from the members holding them (one atomic commit per member, then the set's
count). No torch.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from index import devices
from index.duplicates import clash_message, duplicates_message
from index.construct import new_index
from index.search import Index
from index.select import choose_index, default_max_memory
from index.sources import ArraySource, EmbeddingsSource
from index.store import (METADATA_COLUMNS, commit, data_files, is_set, member_directories, read_info, read_metadata,
                         stored_vectors, update_info, writer_lock)

logger = logging.getLogger(__name__)

REBUILD_GROWTH = 4.0  # warn once an IVF index holds this many times the vectors it was trained for


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _load_for_update(index_dir: str | os.PathLike) -> Index:
    index = Index.load(index_dir, use_gpu=False, mmap=False)
    if "lists" in (index.info.get("files") or {}):
        raise ValueError(f"{index_dir} is merged on disk (index.merge --on-disk); add a part and merge again instead")
    return index


def add_source(index_dir: str | os.PathLike, source: Any, use_gpu: bool | None = None,
               set_metadata: Any = None) -> dict:
    """Append every vector of ``source`` (``index.sources``) to the index in ``index_dir``; a set of indexes
    (``index.store``) takes them into its smallest member. ``set_metadata``: the metadata table of the whole set
    ``index_dir`` is a member of, whose ids the new ones must not repeat."""
    import pyarrow as pa

    if is_set(read_info(index_dir)):
        return _add_to_set(index_dir, source, use_gpu)
    with writer_lock(index_dir):
        current = _load_for_update(index_dir)
        info = dict(current.info)
        if source.dim != current.dim:
            raise ValueError(f"dimension mismatch: the new embeddings are {source.dim}-d but the index holds "
                             f"{current.dim}-d vectors (another encoder?); rebuild the index")
        known, incoming = info.get("encoder_fingerprint"), getattr(source, "fingerprint", None)
        if known and incoming and known != incoming:
            built, new = info.get("encoder_variant"), source.describe().get("encoder_variant")
            if built and new and built != new and info.get("encoder") == source.describe().get("encoder"):
                raise ValueError(f"encoder variant mismatch: the index holds embeddings of the {built} variant of "
                                 f"{info.get('encoder')} but the new ones come from its {new} variant; extract them "
                                 f"with --precision {built}")
            raise ValueError(f"encoder mismatch: the index was built with encoder {str(known)[:12]} "
                             f"but the new embeddings come from {str(incoming)[:12]}; rebuild the index")
        index, keep_alive = devices.to_gpu(current.faiss_index, use_gpu)
        indexed = current.metadata if set_metadata is None else set_metadata
        existing = indexed.column("id").to_numpy()
        tables, added = [], []
        for vectors, table in source.blocks():
            ids = table.column("id").to_numpy().astype(np.int64)
            clash = np.intersect1d(ids, existing)
            if len(clash):
                raise ValueError(clash_message(table, indexed, clash))
            so_far = np.concatenate(added + [ids])
            if len(np.unique(so_far)) != len(so_far):
                raise ValueError(duplicates_message(tables + [table], " within the new embeddings"))
            index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)
            tables.append(table.select(list(METADATA_COLUMNS)))
            added.append(ids)
        cpu_index = devices.to_cpu(index, keep_alive)
        count = int(cpu_index.ntotal)
        info.update(count=count, updated=_now())
        info["updates"] = list(info.get("updates", [])) + [
            {"added": int(sum(len(ids) for ids in added)), "from": source.describe().get("data"), "at": info["updated"]}]
        built_with = int(info.get("count_at_build") or current.count)
        if info.get("train_size") and count > REBUILD_GROWTH * built_with:
            logger.warning("the index holds %d vectors, %.1fx what its quantizer was trained for; rebuild it for best recall",
                           count, count / built_with)
        if (info.get("choice") or {}).get("reason") != "--index given":
            budget = int((info.get("choice") or {}).get("max_memory") or default_max_memory())
            better = choose_index(count, current.dim, budget)
            if better.factory != info.get("factory"):
                logger.warning("at %d vectors index.build would choose %s (not %s); consider rebuilding",
                               count, better.factory, info.get("factory"))
        table = pa.concat_tables([current._metadata.select(list(METADATA_COLUMNS))] + tables)
        return commit(index_dir, cpu_index, table, info)


def _add_to_set(set_dir: str | os.PathLike, source: Any, use_gpu: bool | None) -> dict:
    """``add_source`` for a set: ids checked against every member, vectors into the member holding the fewest (a
    member commit is atomic; the set's ``index.json`` then records the new count)."""
    import pyarrow as pa

    with writer_lock(set_dir):
        members, tables = _member_metadata(set_dir)
        target = members[int(np.argmin([table.num_rows for table in tables]))]
        added = add_source(target, source, use_gpu, set_metadata=pa.concat_tables(tables))
        return _refresh_set(set_dir, members, {**added["updates"][-1], "member": Path(target).name})


def _member_metadata(set_dir: str | os.PathLike) -> tuple[list[str], list[Any]]:
    """The set's member directories and their metadata tables (memory-mapped; no FAISS index is read)."""
    members = member_directories(set_dir, read_info(set_dir))
    return members, [read_metadata(data_files(member, read_info(member))["metadata"]) for member in members]


def _refresh_set(set_dir: str | os.PathLike, members: list[str], update: dict) -> dict:
    """Rewrite the set's ``index.json`` with its members' total count and one more ``updates`` entry."""
    info = read_info(set_dir)
    count = sum(int(read_info(member)["count"]) for member in members)
    return update_info(set_dir, {"count": count, "updated": update.get("at", _now()),
                                 "updates": list(info.get("updates", [])) + [update]})


def _remove_from_set(set_dir: str | os.PathLike, wanted: np.ndarray) -> dict:
    """``remove_ids`` for a set: each member loses the ids it holds (one atomic commit per member)."""
    with writer_lock(set_dir):
        members, tables = _member_metadata(set_dir)
        held = [np.isin(wanted, table.column("id").to_numpy()) for table in tables]
        unknown = wanted[~np.logical_or.reduce(held)]
        if len(unknown):
            raise KeyError(f"sample id {int(unknown[0])} is not in the index")
        if len(wanted) >= sum(table.num_rows for table in tables):
            raise ValueError("removing every vector would leave an empty set; delete the directory instead")
        for member, inside in zip(members, held):
            if inside.any():
                remove_ids(member, wanted[inside])
        return _refresh_set(set_dir, members, {"removed": int(len(wanted)), "at": _now()})


def add_embeddings(index_dir: str | os.PathLike, embeddings: str | os.PathLike, use_gpu: bool | None = None) -> dict:
    """Append an ``export.extract`` embeddings directory to the index."""
    return add_source(index_dir, EmbeddingsSource(embeddings), use_gpu)


def add_arrays(index_dir: str | os.PathLike, vectors: np.ndarray, ids: np.ndarray, table: Any = None) -> dict:
    """Append in-memory vectors with ``ids`` (metadata blank unless ``table`` is given)."""
    return add_source(index_dir, ArraySource(vectors, ids, table=table))


def remove_ids(index_dir: str | os.PathLike, ids: Sequence[int]) -> dict:
    """Remove ``ids`` from the index and its metadata; ``KeyError`` when one is not indexed."""
    import faiss
    import pyarrow as pa
    import pyarrow.compute as pc

    wanted = np.unique(np.asarray(list(ids), dtype=np.int64))
    if len(wanted) == 0:
        raise ValueError("no ids to remove")
    if is_set(read_info(index_dir)):
        return _remove_from_set(index_dir, wanted)
    with writer_lock(index_dir):
        current = _load_for_update(index_dir)
        current.rows(wanted)  # KeyError names the first id that is not indexed
        if len(wanted) >= current.count:
            raise ValueError("removing every vector would leave an empty index; delete the directory instead")
        info = dict(current.info)
        cpu_index = current.faiss_index
        try:
            removed = cpu_index.remove_ids(faiss.IDSelectorBatch(wanted))
        except RuntimeError:  # HNSW cannot unlink nodes: rebuild its graph from the stored vectors
            cpu_index = _rebuild_without(current, wanted, info["factory"])
            removed = len(wanted)
        if removed != len(wanted):
            raise RuntimeError(f"faiss removed {removed} of {len(wanted)} ids; the index was not changed")
        table = current._metadata.filter(pc.invert(pc.is_in(current._metadata.column("id"), value_set=pa.array(wanted))))
        info.update(count=int(cpu_index.ntotal), updated=_now())
        info["updates"] = list(info.get("updates", [])) + [{"removed": int(len(wanted)), "at": info["updated"]}]
        return commit(index_dir, cpu_index, table, info)


def _rebuild_without(current: Index, wanted: np.ndarray, factory: str) -> Any:
    blocks = stored_vectors(current.faiss_index)
    if blocks is None:
        raise ValueError(f"{factory!r} supports neither removal nor reconstruction; rebuild the index without those ids")
    rebuilt = new_index(current.dim, factory)
    devices.set_search_params(rebuilt, current.search_params)
    for vectors, ids in blocks:
        keep = ~np.isin(ids, wanted)
        if keep.any():
            rebuilt.add_with_ids(np.ascontiguousarray(vectors[keep]), ids[keep])
    return rebuilt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m index.add", description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", required=True, help="index directory (RUN/index)")
    parser.add_argument("--embeddings", help="embeddings directory to append (from export.extract)")
    parser.add_argument("--remove", type=int, nargs="+", default=[], help="sample ids to remove")
    parser.add_argument("--remove-file", help="text file with one sample id per line to remove")
    parser.add_argument("--cpu", action="store_true", help="keep FAISS on the CPU even if a GPU is present")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    removing = list(args.remove)
    if args.remove_file:
        removing += [int(line) for line in Path(args.remove_file).read_text().split() if line.strip()]
    if bool(args.embeddings) == bool(removing):
        print("error: give either --embeddings or --remove/--remove-file", file=sys.stderr)
        return 2
    try:
        if args.embeddings:
            info = add_embeddings(args.index, args.embeddings, use_gpu=False if args.cpu else None)
        else:
            info = remove_ids(args.index, removing)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"count": info["count"], "files": info.get("files") or info.get("members"),
                      "updates": info["updates"][-1]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
