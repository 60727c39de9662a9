"""Sample images read back from their shards through the index metadata (``shard`` + ``key``).

No copy of the collection is needed on disk: a result's image is found in the shard its metadata
row names. Plain ``.tar`` shards are read at random: the first visit records each image member's
offset, later reads seek to it. Compressed ``.tar.gz`` shards cannot be seeked, so their image bytes
(still encoded, a few KB per image) are kept in an LRU cache bounded in bytes, not in shards: all of
CIFAR-10 (60,000 JPEGs) takes about 60 MB, after which every thumbnail is a dictionary lookup.
"""
from __future__ import annotations

import io
import os
import tarfile
import threading
from collections import OrderedDict
from typing import Any, Sequence

from trainer.data import storage
from trainer.data.shards import IMAGE_EXTENSIONS, decode_image, iter_shard

DEFAULT_BUDGET_BYTES = 512 << 20
THUMB_MIN_SIDE = 0  # tiny images (CIFAR's 32 px) are sent as they are; CSS scales them up pixelated
THUMB_MAX_SIDE = 256  # large photos are scaled down: the browser never needs more for a thumbnail


def _split(name: str) -> tuple[str, str]:
    """WebDataset key and extension of a member name (same rule as ``trainer.data.shards``)."""
    directory, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (os.path.join(directory, stem) if directory else stem), ext.lower()


class ThumbnailStore:
    """Encoded image bytes of indexed samples, by metadata record; thread-safe (Gradio calls from workers)."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        self.budget_bytes = int(budget_bytes)
        self._cached: OrderedDict[str, dict[str, bytes]] = OrderedDict()  # compressed shards' images
        self._sizes: dict[str, int] = {}
        self._offsets: dict[str, dict[str, tuple[int, int]]] = {}  # plain tars: key -> (offset, size)
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    @property
    def cached_bytes(self) -> int:
        return sum(self._sizes.values())

    def _offsets_of(self, shard: str) -> dict[str, tuple[int, int]]:
        """Image member offsets of a plain tar (headers only are read: fast even for large shards)."""
        with self._lock:
            if shard in self._offsets:
                return self._offsets[shard]
        found: dict[str, tuple[int, int]] = {}
        rank: dict[str, int] = {}
        with tarfile.open(shard, "r:") as tar:
            for info in tar:
                key, ext = _split(info.name)
                if info.isfile() and ext in IMAGE_EXTENSIONS:
                    order = IMAGE_EXTENSIONS.index(ext)  # the reader's preference when a sample has two
                    if order < rank.get(key, len(IMAGE_EXTENSIONS)):
                        rank[key] = order
                        found[key] = (info.offset_data, info.size)
        with self._lock:
            self._offsets[shard] = found
        return found

    def _compressed(self, shard: str) -> dict[str, bytes]:
        with self._lock:
            if shard in self._cached:
                self._cached.move_to_end(shard)
                return self._cached[shard]
            loading = self._loading.setdefault(shard, threading.Lock())
        with loading:  # one reader per shard: a search waits for the warm-up thread instead of decompressing again
            with self._lock:
                if shard in self._cached:
                    return self._cached[shard]
            loaded = {sample.key: sample.image for sample in iter_shard(shard) if sample.image is not None}
        with self._lock:
            self._cached[shard] = loaded
            self._sizes[shard] = sum(len(data) for data in loaded.values())
            while len(self._cached) > 1 and self.cached_bytes > self.budget_bytes:
                oldest, _ = self._cached.popitem(last=False)
                self._sizes.pop(oldest, None)
        return loaded

    def encoded(self, records: Sequence[dict]) -> list[bytes]:
        """The encoded image of each record (``shard``, ``key``), each shard visited once.

        Raises ``FileNotFoundError`` for a shard that is gone and ``KeyError`` for a key it lacks.
        """
        by_shard: dict[str, list[int]] = {}
        for position, record in enumerate(records):
            by_shard.setdefault(str(record["shard"]), []).append(position)
        out: list[bytes | None] = [None] * len(records)
        for shard, positions in by_shard.items():
            if not storage.exists(shard):
                raise FileNotFoundError(f"shard {shard!r} named in the index metadata does not exist")
            if shard in self._offsets or (shard not in self._cached and not _is_compressed(shard)):
                offsets = self._offsets_of(shard)
                with open(shard, "rb") as handle:
                    for position in positions:
                        key = str(records[position]["key"])
                        if key not in offsets:
                            raise KeyError(f"shard {shard!r} holds no image for key {key!r}")
                        offset, size = offsets[key]
                        handle.seek(offset)
                        out[position] = handle.read(size)
            else:
                images = self._compressed(shard)
                for position in positions:
                    key = str(records[position]["key"])
                    if key not in images:
                        raise KeyError(f"shard {shard!r} holds no image for key {key!r}")
                    out[position] = images[key]
        return out  # type: ignore[return-value]

    def images(self, records: Sequence[dict], mode: str = "RGB") -> list[Any]:
        """Decoded PIL images of ``records`` (see ``encoded``)."""
        return [decode_image(data, mode=mode) for data in self.encoded(records)]

    def warm(self, shards: Sequence[str]) -> None:
        """Read ``shards`` ahead (compressed ones into the cache while it has room; plain tars' offsets),
        so the first searches do not pay for decompression. Meant for a background thread; never raises."""
        for shard in shards:
            try:
                if not storage.exists(shard):
                    continue
                if _is_compressed(shard):
                    if self.cached_bytes + os.path.getsize(shard) > self.budget_bytes:
                        break
                    self._compressed(shard)
                else:
                    self._offsets_of(shard)
            except Exception:  # noqa: BLE001 - warming is an optimisation only
                continue

    def image(self, record: dict, mode: str = "RGB") -> Any:
        return self.images([record], mode)[0]


def _is_compressed(path: str) -> bool:
    """Whether ``path`` is read whole into the cache: a compressed tar (no member offsets to seek to), or a shard
    at a URL (one streamed read instead of a request per image)."""
    if storage.is_url(path):
        return True
    with open(path, "rb") as handle:
        magic = handle.read(3)
    return magic[:2] == b"\x1f\x8b" or magic == b"BZh" or magic[:3] == b"\xfd7z"


def thumbnail(image: Any, min_side: int = THUMB_MIN_SIDE, max_side: int = THUMB_MAX_SIDE) -> Any:
    """A gallery-sized copy: large images scaled down; with ``min_side`` tiny ones scaled up by an integer
    factor (nearest: crisp pixels). Never raises (a thumbnail is cosmetic).

    The app sends small images unchanged (``min_side`` 0) and lets the browser scale them up with
    ``image-rendering: pixelated``: encoding 8 PNGs of 32 px instead of 128 px saves ~10-20 ms a query."""
    try:
        from PIL import Image

        width, height = image.size
        side = min(width, height)
        if 0 < side < min_side:
            factor = max(1, min_side // side)
            return image.resize((width * factor, height * factor), Image.NEAREST)
        if max(width, height) > max_side:
            copy = image.copy()
            copy.thumbnail((max_side, max_side), Image.BICUBIC)
            return copy
    except Exception:  # noqa: BLE001 - cosmetic
        pass
    return image


def sprite_sheet(images: Sequence[Any], cell: int = 32, quality: int = 80) -> tuple[bytes, int]:
    """One JPEG holding every image as a ``cell`` x ``cell`` tile, row-major; returns (bytes, columns).

    The map's hover thumbnails are windows onto this single picture, so thousands of points cost one
    download instead of one request each.
    """
    from PIL import Image

    count = max(1, len(images))
    columns = max(1, int(count ** 0.5 + 0.999))
    rows = (count + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell, rows * cell), (255, 255, 255))
    for number, image in enumerate(images):
        tile = image.convert("RGB").resize((cell, cell), Image.BICUBIC)
        sheet.paste(tile, ((number % columns) * cell, (number // columns) * cell))
    buffer = io.BytesIO()
    sheet.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue(), columns
