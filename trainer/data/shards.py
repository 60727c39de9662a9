"""Torch-free access to WebDataset shards: pattern expansion, sample ids, and a plain tar reader.

Serving code (``export.runtime``, ``index``, ``app``) reads shards through this module, so it must
never import torch, webdataset or anything that does.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import Iterator

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm")
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


class ShardPatternError(ValueError):
    """A data pattern that names no existing shard."""


def _expand_braces(pattern: str) -> list[str]:
    """Expand numeric ranges ``{000..009}`` (keeping zero padding), recursively."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    lo, hi = match.group(1), match.group(2)
    width = len(lo)
    head, tail = pattern[: match.start()], pattern[match.end() :]
    out: list[str] = []
    for number in range(int(lo), int(hi) + 1):
        out.extend(_expand_braces(f"{head}{number:0{width}d}{tail}"))
    return out


def expand_patterns(spec: str | list[str], must_exist: bool = True) -> list[str]:
    """Expand a data spec into shard paths.

    ``spec`` is a brace pattern (``train-{000000..000009}.tar.gz``), a glob (``test-*.tar.gz``), a plain
    path, a directory (all ``*.tar`` / ``*.tar.gz`` inside), or several of these joined by ``::``.
    ``pipe:`` and URL specs are passed through untouched. Raises ``ShardPatternError`` naming the
    pattern when a local pattern matches nothing.
    """
    parts = spec if isinstance(spec, list) else [p for p in str(spec).split("::") if p.strip()]
    urls: list[str] = []
    for part in parts:
        part = os.path.expanduser(part.strip())
        if part.startswith(("pipe:", "http://", "https://", "gs://", "s3://")):
            urls.append(part)
            continue
        if os.path.isdir(part):
            found = sorted(glob.glob(os.path.join(part, "*.tar")) + glob.glob(os.path.join(part, "*.tar.gz")))
            if not found and must_exist:
                raise ShardPatternError(f"directory {part!r} holds no .tar or .tar.gz shards")
            urls.extend(found)
            continue
        for expanded in _expand_braces(part):
            if any(ch in expanded for ch in "*?["):
                found = sorted(glob.glob(expanded))
                if not found and must_exist:
                    raise ShardPatternError(f"pattern {expanded!r} matches no file")
                urls.extend(found)
            elif must_exist and not os.path.exists(expanded):
                raise ShardPatternError(f"shard {expanded!r} does not exist")
            else:
                urls.append(expanded)
    if not urls and must_exist:
        raise ShardPatternError(f"data spec {spec!r} names no shard")
    return urls


def key_to_id(key: str) -> int:
    """A stable non-negative 63-bit integer id for a sample key (used when a shard carries no id)."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


@dataclass
class ShardSample:
    """One decoded-metadata sample of a shard; ``image`` holds the encoded bytes (not decoded)."""

    key: str
    url: str
    image: bytes | None = None
    image_ext: str | None = None
    label: int = -1
    caption: str = ""
    meta: dict = field(default_factory=dict)
    sample_id: int = -1


def _split_member_name(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is everything before the first dot of the basename."""
    directory, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (os.path.join(directory, stem) if directory else stem), ext.lower()


def sample_from_members(key: str, url: str, members: dict[str, bytes]) -> ShardSample:
    """Build a ``ShardSample`` from the raw members (extension -> bytes) of one WebDataset sample."""
    sample = ShardSample(key=key, url=url)
    for ext in IMAGE_EXTENSIONS:
        if ext in members:
            sample.image, sample.image_ext = members[ext], ext
            break
    if "cls" in members:
        try:
            sample.label = int(members["cls"].decode("utf-8").strip())
        except ValueError:
            sample.label = -1
    if "txt" in members:
        sample.caption = members["txt"].decode("utf-8", errors="replace").strip()
    if "json" in members:
        try:
            sample.meta = json.loads(members["json"].decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            sample.meta = {}
    if "id" in members:
        sample.sample_id = int(members["id"].decode("utf-8").strip())
    elif isinstance(sample.meta.get("id"), int):
        sample.sample_id = int(sample.meta["id"])
    else:
        sample.sample_id = key_to_id(key)
    return sample


def iter_shard(url: str) -> Iterator[ShardSample]:
    """Yield the samples of one local ``.tar`` / ``.tar.gz`` shard in file order."""
    if not os.path.exists(url):
        raise FileNotFoundError(f"shard {url!r} does not exist")
    current_key: str | None = None
    members: dict[str, bytes] = {}
    with tarfile.open(url, "r:*") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, ext = _split_member_name(info.name)
            if current_key is not None and key != current_key:
                yield sample_from_members(current_key, url, members)
                members = {}
            current_key = key
            handle = tar.extractfile(info)
            members[ext] = handle.read() if handle is not None else b""
    if current_key is not None:
        yield sample_from_members(current_key, url, members)


def iter_samples(spec: str | list[str]) -> Iterator[ShardSample]:
    """Yield the samples of every shard named by ``spec`` (see ``expand_patterns``), in order."""
    for url in expand_patterns(spec):
        yield from iter_shard(url)


def read_manifest(spec: str | list[str]) -> dict:
    """The ``manifest.json`` beside the first shard of ``spec``, or ``{}`` when there is none."""
    urls = expand_patterns(spec)
    path = os.path.join(os.path.dirname(urls[0]), "manifest.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def decode_image(data: bytes, mode: str = "RGB"):
    """Decode encoded image bytes with PIL, converting to ``mode``; raises ``ValueError`` when unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert(mode)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"unreadable image: {error}") from error


def count_samples(urls: list[str]) -> int:
    """Number of samples in ``urls``: from the ``manifest.json`` beside them when it lists every shard,
    else by reading the tar headers (distinct keys)."""
    total = 0
    for url in urls:
        manifest_path = os.path.join(os.path.dirname(url), "manifest.json")
        counted = None
        if os.path.exists(manifest_path):
            with open(manifest_path, encoding="utf-8") as handle:
                manifest = json.load(handle)
            for entries in manifest.get("splits", {}).values():
                for entry in entries:
                    if entry.get("file") == os.path.basename(url):
                        counted = int(entry["samples"])
        if counted is None:
            keys = set()
            with tarfile.open(url, "r:*") as tar:
                for info in tar:
                    if info.isfile():
                        keys.add(_split_member_name(info.name)[0])
            counted = len(keys)
        total += counted
    return total
