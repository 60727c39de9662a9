"""The per-unit extraction pipeline that both engines of ``python -m export.extract`` share.

A shard plan (``plan_shards``) is cut into units (``shard_units``: at most ``batch_size`` samples of one
chunk of one shard, skipping chunks already written), each unit's images are decoded into encoder input
(``decode_batch``, picklable: it runs in worker processes or Ray tasks), and an ``Assembler`` turns the
encoded units of a shard, in sample order, into the parts (``<shard index>-<chunk>``) and the per-shard done
records of ``export/embeddings.py``. The local engine (``export/extract.py``) and the Ray engine
(``export/ray_extract.py``) differ only in where decoding and encoding run, so their outputs are the same and
either resumes the other's. No torch.
"""
from __future__ import annotations

import logging
import os
import sys
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from export.contract import Preprocess, empty_batch, prepare_image
from export.embeddings import (
    MetadataRows, encoder_identity, mark_shard_done, open_output, part_info, part_names, part_rows, write_part,
)
from trainer.data import storage
from trainer.data.shards import ShardSample, decode_image, expand_patterns, iter_shard, read_manifest

logger = logging.getLogger(__name__)

MAX_REPORTED_KEYS = 20  # per shard: the count covers the rest


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


# -- streaming ----------------------------------------------------------------------------------------


@dataclass
class Unit:
    """A run of consecutive samples of one chunk of one shard, decoded together."""

    shard_index: int
    chunk: int
    samples: list[ShardSample]
    chunk_end: bool
    shard_end: bool


def plan_units(plan: Sequence[str], indices: Sequence[int], batch_size: int, chunk_size: int,
           finished: set[str]) -> Iterator[Unit]:
    """Cut the shards into decode units that never cross a chunk; skip chunks already written."""
    for shard_index in indices:
        yield from shard_units(plan[shard_index], shard_index, batch_size, chunk_size, finished)


def shard_units(url: str, shard_index: int, batch_size: int, chunk_size: int, finished: set[str]) -> Iterator[Unit]:
    """The decode units of one shard (``url``, position ``shard_index`` in the plan), in sample order.

    A unit holds at most ``batch_size`` samples of one chunk of ``chunk_size`` samples; chunks whose part
    is in ``finished`` are read past and not yielded. The last unit has ``shard_end`` set (and may be empty).
    Raises ``ValueError`` naming the shard when the archive breaks (after yielding what preceded it).
    """
    batch: list[ShardSample] = []
    open_chunk: int | None = None  # the chunk whose samples are being yielded and not yet closed
    position = 0
    for sample in _read_shard(url):
        chunk, position = position // chunk_size, position + 1
        if open_chunk is not None and chunk != open_chunk:
            yield Unit(shard_index, open_chunk, batch, chunk_end=True, shard_end=False)
            batch, open_chunk = [], None
        if part_name(shard_index, chunk) in finished:
            continue
        open_chunk = chunk
        batch.append(sample)
        if len(batch) == batch_size:
            yield Unit(shard_index, chunk, batch, chunk_end=False, shard_end=False)
            batch = []
    yield Unit(shard_index, open_chunk or 0, batch, chunk_end=open_chunk is not None, shard_end=True)


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
class _Chunk(MetadataRows):
    vectors: list[np.ndarray] = field(default_factory=list)
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


def plan_shards(data_spec: str | list[str]) -> tuple[list[str], list[str]]:
    """``(shard plan, class names)``: the expanded shards (absolute local paths, URLs as given) and the
    classes of the manifest beside them. The plan's order fixes the part names (``<shard index>-<chunk>``)."""
    plan = [storage.absolute(path) for path in expand_patterns(data_spec)]
    return plan, [str(name) for name in read_manifest(plan).get("classes", [])]


def open_extraction(output_dir, encoder_dir, precision: str, provider: str, dim: int, plan: Sequence[str],
                    data_spec: str | list[str], dtype: str, chunk_size: int) -> dict:
    """Create or check (to resume) ``output_dir`` for this encoder variant, shard plan and settings."""
    identity = encoder_identity(encoder_dir, variant=precision, provider=provider)
    return open_output(output_dir, identity, dim, dtype, shards=plan,
                       extra={"data": data_spec if isinstance(data_spec, str) else "::".join(data_spec),
                              "chunk_size": chunk_size})


def progress_bar(plan: Sequence[str], mine: Sequence[int], progress: bool, rank: int = 0, world_size: int = 1):
    """The tqdm bar over this process's shards (total from the manifest when it lists them all)."""
    from tqdm import tqdm

    return tqdm(total=_shard_totals(plan, mine), unit="img",
                desc=f"extract {rank}/{world_size}" if world_size > 1 else "extract",
                disable=not progress, file=sys.stderr, position=rank if world_size > 1 else None)


class Assembler:
    """Turns encoded units of a shard, in sample order, into parts and done records (both engines).

    ``add`` takes a unit (its samples' metadata; image bytes are not needed), the per-sample decode errors
    and the vectors of the decodable samples; it writes the part when the unit closes a chunk and the
    shard's done record when it closes the shard. Units of one shard must arrive in order; units of
    different shards may interleave only through separate assemblers (the Ray engine keeps one per shard).
    """

    def __init__(self, output_dir, plan: Sequence[str], classes: Sequence[str], dim: int) -> None:
        self.output_dir, self.plan, self.classes, self.dim = output_dir, plan, classes, dim
        self.chunk = _Chunk()
        self.shard_skipped, self.shard_keys = 0, []
        self.written = self.skipped = 0

    def add(self, unit: Unit, errors: Sequence[str | None], vectors: np.ndarray | None) -> None:
        chunk, url = self.chunk, self.plan[unit.shard_index]
        if vectors is not None and len(vectors):
            chunk.vectors.append(vectors)
        for sample, error in zip(unit.samples, errors):
            if error is not None:
                chunk.skipped += 1
                self.shard_skipped += 1
                if len(chunk.skipped_keys) < MAX_REPORTED_KEYS:
                    chunk.skipped_keys.append(sample.key)
                if len(self.shard_keys) < MAX_REPORTED_KEYS:
                    self.shard_keys.append(sample.key)
                    logger.warning("skipping %s in %s: %s", sample.key, url, error)
                continue
            chunk.append(sample, url, self.classes)
        if unit.chunk_end:
            self.written += _write_chunk(self.output_dir, unit, chunk, self.dim)
            self.chunk = _Chunk()
        if unit.shard_end:
            self.skipped += self.shard_skipped
            _finish_shard(self.output_dir, unit.shard_index, url, self.shard_keys)
            self.shard_skipped, self.shard_keys = 0, []


def _write_chunk(output_dir, unit: Unit, chunk: _Chunk, dim: int) -> int:
    vectors = np.concatenate(chunk.vectors) if chunk.vectors else np.zeros((0, dim), dtype=np.float32)
    write_part(output_dir, part_name(unit.shard_index, unit.chunk), vectors, chunk.table(),
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
