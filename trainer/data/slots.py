"""Dense memory-bank slots: every training sample's (shard, key) mapped to one of 0..n-1.

Memory-bank objectives (InstDisc's bank, DeepCluster-v2's memory, Exemplar-CNN's surrogate classes) index
tensors of n rows by ``batch["id"]``. Shards written by ``trainer.prepare`` carry dense ids, but img2dataset's
and most others carry none (their hashed ids are 63-bit). So when such a run starts, the loop reads every
shard's tar headers once (``shards.shard_keys``: the same pass that counts the samples) and numbers the samples:
shards in sorted order, samples in tar order. The data workers look each sample up (``slot``) and the mapping
is saved in every checkpoint, so ``--resume`` gets the same slots even when the shards are listed differently.

Compact on purpose: per shard its url and its keys in order; the key -> slot dictionaries are built lazily,
once per data worker. Torch-free.
"""
from __future__ import annotations

import gzip
import json
import os
from typing import Callable

from . import storage
from .shards import shard_keys

SLOTS_FILE = "sample_slots.json.gz"
_REMOTE = ("pipe:", "http://", "https://", "gs://", "s3://", "file://")


def normalise_url(url: str) -> str:
    """The form a shard is recorded under: absolute for local paths (a resumed run may start elsewhere), as
    given for URLs and ``pipe:`` commands."""
    return url if url.startswith(_REMOTE) or "://" in url else os.path.abspath(url)


class DenseSlots:
    """(shard url, sample key) -> dense slot. ``shards`` is a list of (normalised url, keys in tar order); slots
    run over the shards in that order."""

    def __init__(self, shards: list[tuple[str, list[str]]]):
        self.shards = [(url, list(keys)) for url, keys in shards]
        self.offsets: dict[str, int] = {}
        total = 0
        for url, keys in self.shards:
            if url in self.offsets:
                raise ValueError(f"shard {url} is listed twice in the training data; list each shard once")
            self.offsets[url] = total
            total += len(keys)
        self.count = total
        self._lookup: dict[str, dict[str, int]] | None = None

    @classmethod
    def from_urls(cls, urls: list[str], read_keys: Callable[[str], list[str]] = shard_keys) -> "DenseSlots":
        """Number the samples of ``urls``: shards sorted by normalised url, samples in tar order. Remote shards are
        streamed several at a time (their headers come with their bytes)."""
        ordered = sorted({normalise_url(u) for u in urls})
        if any(url.startswith(_REMOTE) for url in ordered):
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=min(8, len(ordered))) as pool:
                return cls(list(zip(ordered, pool.map(read_keys, ordered))))
        return cls([(url, read_keys(url)) for url in ordered])

    def __len__(self) -> int:
        return self.count

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_lookup"] = None  # rebuilt in each data worker: only the compact lists travel
        return state

    def slot(self, url: str, key: str) -> int:
        """The slot of sample ``key`` of shard ``url``; ``KeyError`` with a clear message when it has none."""
        if self._lookup is None:
            self._lookup = {u: {k: i for i, k in enumerate(keys)} for u, keys in self.shards}
        shard = normalise_url(url)
        keys = self._lookup.get(shard)
        if keys is None:
            raise KeyError(f"shard {shard} is not among the {len(self.shards)} shards numbered when the run "
                           f"started; train on the same shards, or start a new run")
        index = keys.get(key)
        if index is None:
            raise KeyError(f"sample {key!r} of shard {shard} was not in that shard when the run started; the shard "
                           f"changed: train on the same shards, or start a new run")
        return self.offsets[shard] + index

    def check_covers(self, current: "DenseSlots") -> None:
        """Refuse (``ValueError``) when ``current`` (the shards as they are now) holds samples this mapping (from
        a checkpoint) lacks: their memory-bank rows would not exist."""
        mine = {url: set(keys) for url, keys in self.shards}
        for url, keys in current.shards:
            known = mine.get(url)
            missing = [k for k in keys if known is None or k not in known]
            if missing:
                what = "a shard not in" if known is None else f"{len(missing)} sample(s) (e.g. {missing[0]!r}) not in"
                raise ValueError(f"--resume: {url} holds {what} the checkpoint's memory-bank slot mapping "
                                 f"({self.count} samples over {len(self.shards)} shards); resume on the shards the "
                                 f"run started with, or start a new run (without --resume, or a new --output)")

    def save(self, directory: str) -> str:
        """Write the mapping as ``directory/sample_slots.json.gz`` (atomically); returns the path."""
        path = os.path.join(directory, SLOTS_FILE)

        def write(temporary: str) -> None:
            with gzip.open(temporary, "wt", encoding="utf-8") as handle:
                json.dump({"version": 1, "shards": [{"url": url, "keys": keys} for url, keys in self.shards]}, handle)

        storage.replace_local(path, write)
        return path

    @classmethod
    def load(cls, directory: str) -> "DenseSlots | None":
        """The mapping saved in ``directory``, or None when it holds none."""
        path = os.path.join(directory, SLOTS_FILE)
        if not os.path.exists(path):
            return None
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            data = json.load(handle)
        return cls([(entry["url"], entry["keys"]) for entry in data["shards"]])
