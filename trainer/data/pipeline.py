"""WebDataset pipelines: an endless, per-rank training stream of objective views, and an ordered eval pass.

Training draws shards with replacement (``ResampledShards``, seeded by rank and worker) and shuffles
samples with a seeded buffer, so a run's data order is a function of its seed; every rank
yields batches forever and the loop decides the step count: ranks never wait on an uneven shard split.
Data workers decode and build the objective's views; undecodable images are skipped, logged and counted
(``batch["skipped"]`` carries the count since the previous batch of that worker).
"""
from __future__ import annotations

import logging
import random
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import webdataset as wds

from . import storage
from .preprocess import Preprocess, preprocess_image
from .shards import ShardSample, decode_image, sample_from_members, sample_text
from .slots import DenseSlots

log = logging.getLogger(__name__)

ViewRecipe = Callable[[object, ShardSample], dict]  # (PIL image, sample) -> {name: tensor | number}


def _members(raw: dict) -> dict[str, bytes]:
    return {k: v for k, v in raw.items() if not k.startswith("__") and isinstance(v, (bytes, bytearray))}


NO_TEXT_HINT = ("img2dataset writes captions only with --caption_col (into `txt` and json[\"caption\"]); "
                "re-download with it, or set data.max_missing_text to allow some samples without text")
MISSING_TEXT_MIN_SAMPLES = 1000  # samples a data worker reads before it judges the fraction without text


class MissingTextError(ValueError):
    """An image-text objective met more samples without text than ``data.max_missing_text`` allows."""


class BuildViews:
    """Pipeline stage: raw tar samples -> dicts of views + ``label`` + ``id`` (+ ``skipped``).

    ``max_missing_text`` (image-text objectives; None for the others): samples without text (``shards.sample_text``)
    are skipped, never trained on with an empty caption, and counted (``missing_text``, since the previous yielded
    sample); once this worker has read ``min_samples`` samples and more than that fraction of them had no text, it
    raises ``MissingTextError``. ``slots`` (memory-bank objectives): ``id`` is the sample's dense slot instead of
    its shard id (``trainer.data.slots``); the view recipe sees it as ``sample.sample_id`` too."""

    def __init__(self, views: ViewRecipe, image_mode: str = "RGB", max_missing_text: float | None = None,
                 slots: DenseSlots | None = None, min_samples: int = MISSING_TEXT_MIN_SAMPLES):
        self.views = views
        self.image_mode = image_mode
        self.max_missing_text = max_missing_text
        self.slots = slots
        self.min_samples = min_samples

    def _check_missing_text(self, missing: int, read: int, sample: ShardSample) -> None:
        if read >= self.min_samples and missing > self.max_missing_text * read:
            raise MissingTextError(
                f"{missing} of the {read} samples this data worker read have no text (no `txt` member and no "
                f"json[\"caption\"]; the last: {sample.key!r} in {sample.url}), more than "
                f"data.max_missing_text={self.max_missing_text}; {NO_TEXT_HINT}")

    def __call__(self, source: Iterable[dict]) -> Iterator[dict]:
        skipped = missing = 0
        read = missing_total = 0
        for raw in source:
            sample = sample_from_members(raw["__key__"], raw.get("__url__", ""), _members(raw))
            if self.max_missing_text is not None:
                read += 1
                if not sample_text(sample):
                    missing += 1
                    missing_total += 1
                    self._check_missing_text(missing_total, read, sample)
                    continue
                self._check_missing_text(missing_total, read, sample)
            if sample.image is None:
                skipped += 1
                log.warning("sample %s in %s has no image; skipped", sample.key, sample.url)
                continue
            if self.slots is not None:
                sample.sample_id = self.slots.slot(sample.url, sample.key)
            try:
                image = decode_image(sample.image, self.image_mode)
            except ValueError as error:
                skipped += 1
                log.warning("sample %s in %s: %s; skipped", sample.key, sample.url, error)
                continue
            out = self.views(image, sample)
            out["label"] = sample.label
            out["id"] = sample.sample_id
            out["skipped"] = skipped
            skipped = 0
            if self.max_missing_text is not None:
                out["missing_text"] = missing
                missing = 0
            yield out


class SeededShuffle:
    """Pipeline stage: a buffered shuffle whose RNG is seeded by ``seed`` and the data-loader worker.

    webdataset's own ``shuffle`` seeds from pid and wall-clock time when no seed is given, so the
    sample order (and with it every short run's result) changed from run to run."""

    def __init__(self, bufsize: int, initial: int, seed: int):
        self.bufsize, self.initial, self.seed = bufsize, min(initial, bufsize), seed

    def __call__(self, source: Iterable[dict]) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        rng = random.Random(self.seed * 1_000_003 + (info.id if info is not None else 0))
        buffer: list = []
        for sample in source:
            buffer.append(sample)
            if len(buffer) < self.initial:
                continue
            if len(buffer) >= self.bufsize:
                yield _pop_random(buffer, rng)
            elif rng.random() < 0.5:  # fill towards bufsize while already yielding
                yield _pop_random(buffer, rng)
        while buffer:
            yield _pop_random(buffer, rng)


def _pop_random(buffer: list, rng: random.Random):
    index = rng.randrange(len(buffer))
    buffer[index], buffer[-1] = buffer[-1], buffer[index]
    return buffer.pop()


def _warn_without_secrets(error: Exception) -> bool:
    """``wds.warn_and_continue`` with credentials and query strings removed from the URLs in the message."""
    error.args = tuple(storage.public(arg) if isinstance(arg, str) else arg for arg in error.args)
    return wds.warn_and_continue(error)


def open_shards(source: Iterable[dict], handler: Callable[[Exception], bool] = _warn_without_secrets) -> Iterator[dict]:
    """Pipeline stage: ``{"url": ...}`` -> ``{"url", "stream"}``, opened through ``trainer.data.storage`` (local
    files, fsspec URLs such as ``s3://``, ``pipe:`` commands); each stream is closed once its shard is read."""
    for source_sample in source:
        url = source_sample["url"]
        try:
            stream = storage.open_read(url)
        except Exception as error:  # an unreadable shard is skipped and logged, like webdataset's own opener
            error.args = error.args + (storage.public(url),)
            if handler(error):
                continue
            break
        try:
            yield {**source_sample, "stream": stream}
        finally:
            try:
                stream.close()
            except OSError as error:  # a pipe: command that failed after its output was read
                log.warning("%s", storage.public(str(error)))


def shard_samples(source: Iterable[dict]) -> Iterator[dict]:
    """Pipeline stage: shard URLs -> raw WebDataset samples (``__key__``, ``__url__``, one entry per member)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    files = tar_file_expander(open_shards(source), handler=_warn_without_secrets)
    return group_by_keys(files, handler=_warn_without_secrets)


def collate(samples: list[dict]) -> dict:
    """Stack tensors; numbers become int64 tensors; ``skipped`` is summed."""
    batch: dict = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if key == "skipped":
            batch[key] = int(sum(values))
        elif isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], np.ndarray):
            batch[key] = torch.from_numpy(np.stack(values))
        else:
            batch[key] = torch.as_tensor(values, dtype=torch.int64)
    return batch


def train_batches(
    urls: list[str],
    views: ViewRecipe,
    batch_size: int,
    num_workers: int = 2,
    seed: int = 0,
    shuffle_buffer: int = 2000,
    max_missing_text: float | None = None,
    slots: DenseSlots | None = None,
) -> Iterable[dict]:
    """An endless iterable of training batches for this rank (rank and worker come from torch/env).

    ``max_missing_text`` and ``slots``: see ``BuildViews`` (image-text and memory-bank objectives)."""
    pipeline = wds.DataPipeline(
        wds.ResampledShards(urls, seed=seed, deterministic=True),
        shard_samples,
        SeededShuffle(shuffle_buffer, initial=500, seed=seed),
        BuildViews(views, max_missing_text=max_missing_text, slots=slots),
        wds.batched(batch_size, collation_fn=collate, partial=False),
    )
    return wds.WebLoader(
        pipeline,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),  # the workers' torch/random/numpy seeds follow from it
    )


class EvalView:
    """The deterministic evaluation view: ``Preprocess`` (resize, centre crop, normalise)."""

    def __init__(self, spec: Preprocess):
        self.spec = spec

    def __call__(self, image, sample: ShardSample) -> dict:
        return {"image": torch.from_numpy(preprocess_image(image, self.spec))}


def eval_batches(urls: list[str], spec: Preprocess, batch_size: int = 256, num_workers: int = 2) -> Iterable[dict]:
    """One ordered pass over ``urls`` (each shard read once, by one worker), evaluation preprocessing."""
    num_workers = max(0, min(num_workers, len(urls)))
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_worker,
        shard_samples,
        BuildViews(EvalView(spec), "L" if spec.channels == 1 else "RGB"),
        wds.batched(batch_size, collation_fn=collate, partial=True),
    )
    return wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers)
