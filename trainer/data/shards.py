"""Torch-free access to WebDataset shards: pattern expansion, sample ids, and a plain tar reader.

Serving code (``export.runtime``, ``index``, ``app``) reads shards through this module, so it must
never import torch, webdataset or anything that does.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import Iterator

from trainer.data import storage

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm")
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")
SHARD_SUFFIXES = (".tar", ".tar.gz")


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
    path, a directory (all ``*.tar`` / ``*.tar.gz`` inside), or several of these joined by ``::``; each may
    be a local path or a URL (``s3://bucket/dir/train-*.tar``, ``gs://...``: braces, globs and "directories"
    are expanded through fsspec; ``http(s)://`` and ``pipe:`` get their braces expanded only, as they cannot
    be listed). Raises ``ShardPatternError`` naming the pattern (without credentials) when a local or
    listable remote pattern matches nothing.
    """
    parts = spec if isinstance(spec, list) else [p for p in str(spec).split("::") if p.strip()]
    urls: list[str] = []
    for part in parts:
        part = os.path.expanduser(part.strip())
        if storage.is_url(part):
            urls.extend(_expand_url(part, must_exist))
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
        raise ShardPatternError(f"data spec {storage.public(str(spec))!r} names no shard")
    return urls


def _expand_url(part: str, must_exist: bool) -> list[str]:
    """Brace ranges, then (for listable stores such as s3:// and gs://) globs and directories, of one URL."""
    expanded = _expand_braces(part)
    if storage.is_pipe(part):
        return expanded
    if storage.protocol(part) in ("http", "https"):
        if any(storage.has_wildcard(url.split("?", 1)[0]) for url in expanded):
            raise ShardPatternError(f"{storage.public(part)!r}: http(s) URLs cannot be listed, so globs do not work "
                                    "there; name the shards with a brace range ({000000..000009})")
        return expanded
    found: list[str] = []
    listings: dict[str, set[str]] = {}
    try:
        for url in expanded:
            if storage.has_wildcard(url):
                matches = storage.glob(url)
                if not matches and must_exist:
                    raise ShardPatternError(f"pattern {storage.public(url)!r} matches no object")
                found.extend(matches)
            elif url.endswith(SHARD_SUFFIXES):
                parent = storage.dirname(url)
                if parent not in listings:
                    listings[parent] = set(storage.listdir(parent)) if must_exist else set()
                if must_exist and storage.basename(url) not in listings[parent]:
                    raise ShardPatternError(f"shard {storage.public(url)!r} does not exist")
                found.append(url)
            else:  # a "directory": every shard under the prefix
                inside = [storage.join(url, name) for name in storage.listdir(url) if name.endswith(SHARD_SUFFIXES)]
                if inside:
                    found.extend(inside)
                elif storage.exists(url):
                    found.append(url)
                elif must_exist:
                    raise ShardPatternError(f"{storage.public(url)!r} is neither a shard nor a directory holding "
                                            ".tar or .tar.gz shards")
    except storage.StorageError as error:
        raise ShardPatternError(f"cannot expand {storage.public(part)!r}: {error}") from error
    return found


def dataset_name(url: str) -> str:
    """The name of the dataset a shard belongs to: the directory holding it.

    Local paths: the parent directory's name (of the absolute path). URLs (``s3://b/laion/00000.tar``,
    ``file://``, ``http(s)://``): the last path component before the file name. ``pipe:`` commands: the same, from
    the last token that ends in ``.tar`` / ``.tar.gz`` (``pipe:aws s3 cp s3://b/laion/00000.tar -`` -> ``laion``).
    Hashed sample ids include it, so two img2dataset runs (both keys ``000000000`` ...) get different ids."""
    target = url
    if url.startswith("pipe:"):
        tokens = [t.strip("'\"") for t in url[len("pipe:"):].split()]
        shards = [t for t in tokens if t.endswith((".tar", ".tar.gz", ".tgz"))]
        target = shards[-1] if shards else ""
    if "://" in target:
        path = target.split("://", 1)[1].split("?", 1)[0].split("#", 1)[0]
        parts = [p for p in path.split("/") if p]
        return parts[-2] if len(parts) >= 2 else ""
    if not target:
        return ""
    return os.path.basename(os.path.dirname(os.path.abspath(target)))


def key_to_id(key: str, dataset: str) -> int:
    """A stable non-negative 63-bit integer id for the sample ``key`` of ``dataset`` (see ``dataset_name``), used
    when a shard carries no ``id`` member nor json id: a hash of both, so the same key in two datasets (every
    img2dataset run starts at ``000000000``) gets two ids."""
    digest = hashlib.blake2b(f"{dataset}/{key}".encode("utf-8"), digest_size=8).digest()
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
    """Build a ``ShardSample`` from the raw members (extension -> bytes) of one WebDataset sample.

    The caption is the ``txt`` member, else ``json["caption"]`` (img2dataset writes ``txt`` only with
    ``--caption_col`` but may keep the caption in its json); empty when neither is there. The id is the ``id``
    member, else an integer ``json["id"]``, else ``key_to_id(key, dataset_name(url))``."""
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
    if "json" in members:
        try:
            sample.meta = json.loads(members["json"].decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            sample.meta = {}
        if not isinstance(sample.meta, dict):
            sample.meta = {}
    if "txt" in members:
        sample.caption = members["txt"].decode("utf-8", errors="replace").strip()
    elif isinstance(sample.meta.get("caption"), str):
        sample.caption = sample.meta["caption"].strip()
    if "id" in members:
        sample.sample_id = int(members["id"].decode("utf-8").strip())
    elif isinstance(sample.meta.get("id"), int) and not isinstance(sample.meta.get("id"), bool):
        sample.sample_id = int(sample.meta["id"])
    else:
        sample.sample_id = key_to_id(key, dataset_name(url))
    return sample


def sample_text(sample: ShardSample) -> str:
    """The text an image-text objective trains on: the caption, else a string ``json["label"]`` (class-name
    shards); empty when the sample has none (``trainer.data.views.ImageText`` reads the same)."""
    if sample.caption:
        return sample.caption
    label = sample.meta.get("label") if isinstance(sample.meta, dict) else None
    return label.strip() if isinstance(label, str) else ""


def shard_keys(url: str) -> list[str]:
    """The sample keys of one shard in tar order, from its tar headers only (no member is read): what the dense
    memory-bank slots of ``trainer.data.slots`` are built from. A key that comes back later in the shard is
    listed once."""
    keys: list[str] = []
    seen: set[str] = set()
    with _open_headers(url) as tar:
        for info in tar:
            if info.isfile():
                key = _split_member_name(info.name)[0]
                if key not in seen:
                    seen.add(key)
                    keys.append(key)
            tar.members = []  # a streamed tar would otherwise keep every header
    return keys


@contextlib.contextmanager
def _open_headers(url: str) -> Iterator[tarfile.TarFile]:
    """A tar to walk the headers of: a local file (seeking past members), or a URL / ``pipe:`` stream."""
    if storage.is_url(url):
        with storage.open_read(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            yield tar
        return
    with tarfile.open(url, "r:*") as tar:
        yield tar


def iter_shard(url: str) -> Iterator[ShardSample]:
    """Yield the samples of one ``.tar`` / ``.tar.gz`` shard in file order: a local file, or a URL / ``pipe:``
    command streamed once (``trainer.data.storage``)."""
    if storage.is_url(url):
        yield from _iter_stream(url)
        return
    if not os.path.exists(url):
        raise FileNotFoundError(f"shard {url!r} does not exist")
    with tarfile.open(url, "r:*") as tar:
        yield from _group_members(url, tar)


def _iter_stream(url: str) -> Iterator[ShardSample]:
    """The samples of a remote shard, read as a tar stream (``r|*``: no seeking, nothing kept in memory)."""
    with storage.open_read(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        yield from _group_members(url, tar)


def _group_members(url: str, tar: tarfile.TarFile) -> Iterator[ShardSample]:
    current_key: str | None = None
    members: dict[str, bytes] = {}
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
        tar.members = []  # a streamed tar would otherwise keep every header
    if current_key is not None:
        yield sample_from_members(current_key, url, members)


def iter_samples(spec: str | list[str]) -> Iterator[ShardSample]:
    """Yield the samples of every shard named by ``spec`` (see ``expand_patterns``), in order."""
    for url in expand_patterns(spec):
        yield from iter_shard(url)


def read_manifest(spec: str | list[str]) -> dict:
    """The ``manifest.json`` beside the first shard of ``spec`` (local or URL), or ``{}`` when there is none."""
    urls = expand_patterns(spec)
    return _manifest_beside(urls[0])


def _manifest_beside(url: str) -> dict:
    """The parsed ``manifest.json`` in the directory of ``url``; ``{}`` when absent or for ``pipe:`` shards."""
    if storage.is_pipe(url):
        return {}
    path = storage.join(storage.dirname(url), "manifest.json")
    if not storage.is_url(path):
        if not os.path.exists(path):
            return {}
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    try:
        return json.loads(storage.read_bytes(path).decode("utf-8"))
    except FileNotFoundError:
        return {}


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
    else by reading the tar headers (distinct keys); remote shards are streamed once, several at a time."""
    manifests: dict[str, dict] = {}
    total, uncounted = 0, []
    for url in urls:
        directory = storage.dirname(url)
        if directory not in manifests:
            manifests[directory] = _manifest_beside(url)
        counted = None
        for entries in manifests[directory].get("splits", {}).values():
            for entry in entries:
                if entry.get("file") == storage.basename(url):
                    counted = int(entry["samples"])
        if counted is None:
            uncounted.append(url)
        else:
            total += counted
    remote = [url for url in uncounted if storage.is_url(url)]
    total += sum(_count_keys(url) for url in uncounted if not storage.is_url(url))
    if remote:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(8, len(remote))) as pool:
            total += sum(pool.map(_count_keys, remote))
    return total


def _count_keys(url: str) -> int:
    """Distinct sample keys of one shard, from its tar headers (``shard_keys``)."""
    return len(shard_keys(url))