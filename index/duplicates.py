"""The error for a sample id that occurs twice: both samples' keys and shards, and how to fix it.

Shards without an ``id`` member (img2dataset's, most others) get ids hashed from the dataset name (the
directory holding the shard) and the sample key (``trainer.data.shards.key_to_id``), so two datasets only
collide when their directories share a name, or when one shard holds a key twice.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

DUPLICATE_FIX = ("samples without an `id` member get ids hashed from the name of the directory holding the shard "
                 "and the key, so these are two datasets in directories with the same name, or one key written "
                 "twice: rename one directory, or re-shard with `python -m trainer.prepare`, which writes explicit "
                 "ids")


def duplicate_id_message(sample_id: int, first: tuple[str, str], second: tuple[str, str],
                         where: str = "") -> str:
    """The message for ``sample_id`` held by ``first`` and ``second``, each (key, shard)."""
    (key_a, shard_a), (key_b, shard_b) = first, second
    return (f"duplicate sample id {int(sample_id)}{where}: key {key_a!r} in {shard_a} and key {key_b!r} in "
            f"{shard_b}; ids must be unique in an index. {DUPLICATE_FIX}")


def _rows(tables: Sequence[Any]) -> tuple[np.ndarray, list, list]:
    ids, keys, shards = [], [], []
    for table in tables:
        ids.append(np.asarray(table.column("id").to_numpy(), dtype=np.int64))
        names = table.column_names
        count = table.num_rows
        keys.extend(table.column("key").to_pylist() if "key" in names else ["?"] * count)
        shards.extend(table.column("shard").to_pylist() if "shard" in names else ["?"] * count)
    return (np.concatenate(ids) if ids else np.zeros(0, np.int64)), keys, shards


def duplicates_message(tables: Sequence[Any], where: str = "") -> str:
    """The message for the first id that occurs twice in the metadata ``tables`` (pyarrow, with ``id``, ``key``
    and ``shard`` columns) taken together; how many ids repeat when there are several."""
    ids, keys, shards = _rows(tables)
    order = np.argsort(ids, kind="stable")
    repeated = np.nonzero(ids[order][1:] == ids[order][:-1])[0]
    if not len(repeated):
        return f"duplicate sample ids{where}; ids must be unique in an index. {DUPLICATE_FIX}"
    a, b = int(order[repeated[0]]), int(order[repeated[0] + 1])
    message = duplicate_id_message(ids[a], (keys[a], shards[a]), (keys[b], shards[b]), where)
    others = len(np.unique(ids[order][1:][repeated])) - 1
    return message if not others else f"{message} ({others} more id(s) repeat)"


def clash_message(new: Any, existing: Any, clash: np.ndarray) -> str:
    """The message for ids of the ``new`` metadata table that the index's ``existing`` metadata already holds."""
    sample_id = int(clash[0])
    found = []
    for table in (existing, new):
        ids = np.asarray(table.column("id").to_numpy(), dtype=np.int64)
        at = int(np.nonzero(ids == sample_id)[0][0])
        found.append((table.column("key")[at].as_py(), table.column("shard")[at].as_py()))
    more = f" ({len(clash) - 1} more id(s) clash)" if len(clash) > 1 else ""
    return (f"duplicate sample id {sample_id}: key {found[1][0]!r} in {found[1][1]} is already in the index as key "
            f"{found[0][0]!r} in {found[0][1]}{more}. The same sample added twice: remove it first (--remove); "
            f"else {DUPLICATE_FIX}")
