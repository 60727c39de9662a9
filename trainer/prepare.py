"""Turn images into WebDataset shards: ``python -m trainer.prepare --source PATH --output DIR``.

Sources (detected automatically):
- an image folder: ``SOURCE/<class>/<image>`` (class sub-folders become labels), optionally split as
  ``SOURCE/train/<class>/...`` and ``SOURCE/test/<class>/...``; a same-name ``.txt`` beside an image is its
  caption (otherwise "a photo of a <class>.");
- a Fashion-MNIST (or MNIST) IDX folder: ``train-images-idx3-ubyte[.gz]`` and friends;
- existing WebDataset shards (a directory, glob or brace pattern): re-sharded with ids added.

Each sample gets ``png``/``jpg``, ``cls``, ``txt``, ``json`` and ``id``: a dense integer, unique across splits
and stable for the same source, that memory-bank objectives index by. ``manifest.json`` records class names,
sample counts per shard and what was skipped. Unreadable images are counted, reported and skipped.
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import logging
import os
import struct
import sys
import tarfile
import time
from dataclasses import dataclass, field
from typing import Iterator

from trainer.data import storage
from trainer.data.shards import IMAGE_EXTENSIONS, ShardPatternError, decode_image, expand_patterns, iter_shard

log = logging.getLogger("manyview.prepare")

FASHION_MNIST_CLASSES = [
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
]
MNIST_CLASSES = [str(d) for d in range(10)]
CAPTION_TEMPLATES = [
    "a photo of a {}.", "a black and white photo of a {}.", "a low resolution photo of a {}.",
    "a picture of a {}.", "a small photo of the {}.", "a grayscale image of a {}.", "a close-up photo of a {}.",
    "a product photo of a {}.",
]


@dataclass
class Record:
    """One sample to write: encoded image bytes and what goes beside them."""

    key: str
    image: bytes
    image_ext: str
    label: int
    caption: str
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- sources
def _read_idx(path: str):
    import numpy as np

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    zero, dtype, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * dims, data[4 : 4 + 4 * dims])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _idx_file(source: str, stem: str) -> str | None:
    for name in (stem, stem + ".gz"):
        if os.path.exists(os.path.join(source, name)):
            return os.path.join(source, name)
    return None


def is_idx_folder(source: str) -> bool:
    return os.path.isdir(source) and _idx_file(source, "train-images-idx3-ubyte") is not None


def idx_records(source: str, classes: list[str]) -> dict[str, Iterator[Record]]:
    """Fashion-MNIST-style IDX folder -> records per split (PNG, grayscale), captions from class names."""
    from PIL import Image

    splits = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

    def generate(split: str, images_stem: str, labels_stem: str) -> Iterator[Record]:
        images = _read_idx(_idx_file(source, images_stem))
        labels = _read_idx(_idx_file(source, labels_stem))
        if len(images) != len(labels):
            raise ValueError(f"{source}: {len(images)} {split} images but {len(labels)} labels")
        for index, (pixels, label) in enumerate(zip(images, labels)):
            buffer = io.BytesIO()
            Image.fromarray(pixels, mode="L").save(buffer, format="PNG", optimize=False)
            name = classes[int(label)]
            caption = CAPTION_TEMPLATES[index % len(CAPTION_TEMPLATES)].format(name)
            yield Record(f"{split}_{index:06d}", buffer.getvalue(), "png", int(label), caption,
                         {"label": name, "split": split, "source": f"{os.path.basename(images_stem)}[{index}]"})

    return {split: generate(split, *stems) for split, stems in splits.items()
            if _idx_file(source, stems[0]) and _idx_file(source, stems[1])}


def _class_folders(root: str) -> list[str]:
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))


def folder_records(source: str) -> tuple[dict[str, Iterator[Record]], list[str]]:
    """Image folder -> records per split and the class names (sorted folder names)."""
    split_dirs = [s for s in ("train", "val", "test") if os.path.isdir(os.path.join(source, s))]
    roots = {s: os.path.join(source, s) for s in split_dirs} or {"train": source}
    classes = sorted({c for root in roots.values() for c in _class_folders(root)})
    if not classes:
        raise ValueError(f"{source}: no class sub-folders (expected SOURCE/<class>/<image> or SOURCE/train/<class>/...)")
    index = {name: i for i, name in enumerate(classes)}

    def generate(split: str, root: str) -> Iterator[Record]:
        for name in _class_folders(root):
            folder = os.path.join(root, name)
            for filename in sorted(os.listdir(folder)):
                stem, ext = os.path.splitext(filename)
                ext = ext.lower().lstrip(".")
                if ext not in IMAGE_EXTENSIONS:
                    continue
                with open(os.path.join(folder, filename), "rb") as handle:
                    data = handle.read()
                caption_path = os.path.join(folder, stem + ".txt")
                if os.path.exists(caption_path):
                    with open(caption_path, encoding="utf-8", errors="replace") as handle:
                        caption = handle.read().strip()
                else:
                    caption = f"a photo of a {name}."
                relative = os.path.relpath(os.path.join(folder, filename), source)
                key = f"{split}_{name}_{stem}".replace(".", "_").replace(" ", "_")
                yield Record(key, data, "jpg" if ext == "jpeg" else ext, index[name], caption,
                             {"label": name, "split": split, "source": relative})

    return {split: generate(split, root) for split, root in roots.items()}, classes


def shard_records(spec: str) -> tuple[dict[str, Iterator[Record]], list[str]]:
    """Existing shards -> records; the split is the shard name's prefix before '-' (train-000000 -> train)."""
    from trainer.data.shards import read_manifest

    urls = expand_patterns(spec)
    classes = list(read_manifest(urls).get("classes", []))
    by_split: dict[str, list[str]] = {}
    for url in urls:
        base = os.path.basename(url)
        split = base.split("-")[0] if "-" in base else "train"
        by_split.setdefault(split, []).append(url)

    def generate(shard_urls: list[str]) -> Iterator[Record]:
        for url in shard_urls:
            for sample in iter_shard(url):
                meta = dict(sample.meta)
                meta.pop("id", None)
                yield Record(sample.key, sample.image or b"", sample.image_ext or "jpg", sample.label, sample.caption, meta)

    return {split: generate(group) for split, group in by_split.items()}, classes


# ---------------------------------------------------------------------------------------------- writing
class ShardWriter:
    """Writes ``{split}-{index:06d}.tar[.gz]`` with at most ``shard_size`` samples each, atomically."""

    def __init__(self, output: str, split: str, shard_size: int, compress: bool = True):
        self.output, self.split, self.shard_size, self.compress = output, split, shard_size, compress
        self.index, self.count, self.tar, self.path = 0, 0, None, None
        self.shards: list[dict] = []

    def _open(self) -> None:
        name = f"{self.split}-{self.index:06d}.tar" + (".gz" if self.compress else "")
        self.path = os.path.join(self.output, name)
        self.tar = tarfile.open(self.path + ".tmp", "w:gz" if self.compress else "w")
        self.count = 0

    def _close(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        os.replace(self.path + ".tmp", self.path)
        self.shards.append({"file": os.path.basename(self.path), "samples": self.count})
        self.tar, self.index = None, self.index + 1

    def write(self, record: Record, sample_id: int) -> None:
        if self.tar is None:
            self._open()
        meta = {**record.meta, "id": sample_id}
        members = {
            record.image_ext: record.image,
            "cls": str(record.label).encode(),
            "txt": record.caption.encode("utf-8"),
            "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
            "id": str(sample_id).encode(),
        }
        for ext, payload in members.items():
            info = tarfile.TarInfo(f"{record.key}.{ext}")
            info.size, info.mtime, info.mode = len(payload), 0, 0o644  # fixed mtime: reproducible shards
            self.tar.addfile(info, io.BytesIO(payload))
        self.count += 1
        if self.count >= self.shard_size:
            self._close()

    def close(self) -> list[dict]:
        self._close()
        return self.shards


def write_shards(splits: dict[str, Iterator[Record]], classes: list[str], output: str, shard_size: int,
                 compress: bool, source: str, verify_images: bool = True) -> dict:
    """Write every split, assigning dense ids across splits; returns (and writes) the manifest."""
    from tqdm.auto import tqdm

    os.makedirs(output, exist_ok=True)
    manifest: dict = {"classes": classes, "splits": {}, "skipped": [], "source": os.path.abspath(source) if os.path.exists(source) else source,
                      "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    next_id = 0
    for split, records in splits.items():
        writer = ShardWriter(output, split, shard_size, compress)
        for record in tqdm(records, desc=f"prepare {split}", unit="img", disable=None):
            if verify_images:
                try:
                    decode_image(record.image)
                except ValueError as error:
                    manifest["skipped"].append({"key": record.key, "split": split, "reason": str(error)[:200]})
                    log.warning("skipped %s (%s): %s", record.key, split, error)
                    continue
            writer.write(record, next_id)
            next_id += 1
        manifest["splits"][split] = writer.close()
    manifest["samples"] = {split: sum(s["samples"] for s in shards) for split, shards in manifest["splits"].items()}

    def write(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=1)

    storage.replace_local(os.path.join(output, "manifest.json"), write)
    return manifest


def prepare(source: str, output: str, shard_size: int = 10000, compress: bool = True,
            classes: list[str] | None = None, limit: int | None = None) -> dict:
    """Detect the kind of ``source`` and write shards + manifest into ``output``."""
    import itertools

    if is_idx_folder(source):
        names = classes or (FASHION_MNIST_CLASSES if "fashion" in os.path.abspath(source).lower() else MNIST_CLASSES)
        splits = idx_records(source, names)
    elif os.path.isdir(source) and not expand_patterns(source, must_exist=False):
        splits, names = folder_records(source)
    else:
        if not os.path.exists(source) and not any(ch in source for ch in "*?{") and "::" not in source:
            raise FileNotFoundError(f"source {source!r} does not exist")
        splits, names = shard_records(source)
        names = classes or names
    if limit is not None:
        splits = {split: itertools.islice(records, limit) for split, records in splits.items()}
    return write_shards(splits, names, output, shard_size, compress, source)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="prepare", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--source", required=True, help="image folder, IDX folder, or shards (dir/glob/brace)")
    parser.add_argument("--output", required=True, help="directory for the shards and manifest.json")
    parser.add_argument("--shard-size", type=int, default=10000, help="samples per shard")
    parser.add_argument("--no-compress", action="store_true", help="write .tar instead of .tar.gz")
    parser.add_argument("--classes", help="comma-separated class names (IDX sources; overrides detection)")
    parser.add_argument("--limit", type=int, help="at most N samples per split (quick experiments)")
    args = parser.parse_args(argv)
    try:
        manifest = prepare(args.source, args.output, args.shard_size, not args.no_compress,
                           args.classes.split(",") if args.classes else None, args.limit)
    except (FileNotFoundError, ShardPatternError, ValueError) as error:
        parser.error(str(error))
    counts = ", ".join(f"{split}: {n}" for split, n in manifest["samples"].items())
    print(f"wrote {args.output}: {counts}; {len(manifest['classes'])} classes; skipped {len(manifest['skipped'])} unreadable")
    return 0


if __name__ == "__main__":
    sys.exit(main())
