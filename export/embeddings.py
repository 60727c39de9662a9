"""The on-disk format of extracted embeddings (``python -m export.extract``), without torch.

An embeddings directory ``EMB`` holds::

    embeddings.json           the manifest: format, dim, dtype, encoder identity, shard plan, complete flag
    parts/<part>.npy          float16 or float32 [n, D], L2-normalised rows (the dtype the manifest names)
    parts/<part>.parquet      n rows of metadata, same order as the .npy rows
    done/<shard-index>.json   one per finished shard (written by the extractor): counts and skipped keys

Metadata columns (the same as ``index/build.py``'s ``metadata.parquet``): ``id`` int64, ``key`` string,
``shard`` string (absolute path), ``label`` int64 (-1 when none), ``label_name`` string, ``caption`` string.

Global order: parts in lexicographic order of their names, rows in file order within a part. The
extractor names parts ``<shard index in the sorted shard plan, 6 digits>-<chunk, 6 digits>``, so the
global order is shard order then sample order, whatever the number of processes that wrote them.

Atomicity: ``write_part`` writes both files under temporary names and renames the ``.npy`` first and
the ``.parquet`` last; a part exists only when its ``.parquet`` does (a stray ``.npy`` from an
interrupted write is ignored and overwritten). ``embeddings.json`` is replaced atomically.

Object storage: ``EMB`` may be a URL (``s3://bucket/emb``, ``gs://...``; ``trainer.data.storage``, credentials from
the environment). The same order holds there: each file is one PUT, the ``.parquet`` after its ``.npy``, done
records after their parts, and the manifest's ``complete`` flag last. URLs recorded in the manifest (shard plan,
data spec) carry no credentials or query strings.

Completeness: ``embeddings_info(path)["complete"]`` is true when the manifest says so (``finalize``),
or when it has a shard plan and every planned shard has its ``done`` record. ``read_embeddings``
refuses an incomplete directory unless ``allow_incomplete=True``.

Typical reader (e.g. ``index.build --embeddings EMB``)::

    from export.embeddings import embeddings_info, read_embeddings
    info = embeddings_info(EMB)          # {"dim": 512, "count": 10000, "complete": True, "encoder": {...}, ...}
    for vectors, table in read_embeddings(EMB):   # float32 [n, D] (re-normalised), pyarrow.Table of n rows
        index.add_with_ids(vectors, table.column("id").to_numpy())
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from export.contract import l2_normalize, preprocess_path, read_json_object, read_preprocess, variant_files
from trainer.data import storage

FORMAT = "manyview-embeddings"
VERSION = 1
MANIFEST = "embeddings.json"
PARTS_DIR = "parts"
DONE_DIR = "done"
DTYPES = ("float16", "float32")
METADATA_COLUMNS = ("id", "key", "shard", "label", "label_name", "caption")
_PART_INFO_KEY = "manyview.part"
_PART_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class EmbeddingsError(ValueError):
    """An embeddings directory that cannot be read or written as asked (missing, inconsistent, incomplete)."""


class EmbeddingsMismatchError(EmbeddingsError):
    """The output directory already holds embeddings of a different encoder (or dim / dtype)."""


# -- encoder identity -------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def encoder_identity(onnx_dir: str | os.PathLike, variant: str = "fp32", provider: str | None = None) -> dict:
    """What identifies the encoder that made a set of embeddings: ``fingerprint`` (sha256 over the image
    encoder file of ``variant`` and ``preprocess.json``; for fp32, ``image_encoder.onnx``), the ``variant``
    (fp32, fp16 or int8: their embeddings differ slightly, so they count as different encoders and never
    mix in one output), the ``image_model`` file, the ``provider`` it ran on (recorded, not fingerprinted),
    the ``directory`` it was read from and the ``preprocess`` contents."""
    directory = Path(onnx_dir).expanduser().resolve()
    contents = read_preprocess(directory)
    model = directory / variant_files(contents, variant)["image"]
    if not model.is_file():
        raise FileNotFoundError(f"encoder file {str(model)!r} does not exist")
    digest = hashlib.sha256()
    digest.update(file_sha256(model).encode())
    digest.update(file_sha256(preprocess_path(directory)).encode())
    return {"fingerprint": digest.hexdigest(), "variant": variant, "image_model": model.name, "provider": provider,
            "directory": str(directory), "preprocess": contents}


# -- manifest ---------------------------------------------------------------------------------------


def _write_json_atomic(path: str | os.PathLike, data: dict) -> None:
    """Replace ``path`` (local or URL) with ``data`` as indented JSON, in one write (``storage.write_bytes``)."""
    storage.write_bytes(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))


def _name(path: str | os.PathLike) -> str:
    """``path`` as error messages and logs show it (URLs without credentials)."""
    return storage.public(os.fspath(path))


def _read_json(path: str, missing: str) -> dict:
    """The JSON object at ``path`` (local or URL); ``EmbeddingsError(missing)`` when absent."""
    if not storage.is_url(path):
        if not os.path.isfile(path):
            raise EmbeddingsError(missing)
        return read_json_object(path, EmbeddingsError, "embeddings")
    try:
        data = json.loads(storage.read_bytes(path).decode("utf-8"))
    except FileNotFoundError as error:
        raise EmbeddingsError(missing) from error
    except ValueError as error:
        raise EmbeddingsError(f"{_name(path)} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise EmbeddingsError(f"{_name(path)} must hold a JSON object, found {type(data).__name__}")
    return data


def read_manifest(path: str | os.PathLike) -> dict:
    """The parsed ``embeddings.json`` of ``path`` (a directory or URL); ``EmbeddingsError`` when absent or not
    this format."""
    manifest_path = storage.join(path, MANIFEST)
    manifest = _read_json(manifest_path, f"{_name(path)!r} is not an embeddings directory (no {MANIFEST})")
    manifest_path = _name(manifest_path)
    if manifest.get("format") != FORMAT:
        raise EmbeddingsError(f"{manifest_path} is not a {FORMAT} manifest")
    if int(manifest.get("version", 0)) > VERSION:
        raise EmbeddingsError(f"{manifest_path} has format version {manifest.get('version')}; "
                              f"this code reads <= {VERSION}")
    return manifest


def open_output(
    output_dir: str | os.PathLike,
    encoder: dict,
    dim: int,
    dtype: str = "float16",
    shards: Sequence[str] | None = None,
    extra: dict | None = None,
) -> dict:
    """Create ``output_dir`` with its manifest, or check that an existing one matches (for resuming).

    ``encoder`` is ``encoder_identity(...)``. ``shards`` is the ordered shard plan (absolute paths or URLs, recorded
    without credentials); part ``NNNNNN-*`` belongs to ``shards[NNNNNN]``. ``output_dir`` may be a URL. Raises
    ``EmbeddingsMismatchError`` when the directory holds embeddings of another encoder, dim, dtype or shard plan.
    Safe to call from several processes at once (they all write the same content). Returns the manifest.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    output = os.fspath(output_dir)
    plan = [storage.describe(shard) for shard in shards] if shards is not None else None
    extra = {key: storage.public(value) if isinstance(value, str) else value for key, value in (extra or {}).items()}
    if storage.exists(storage.join(output, MANIFEST)):
        existing = read_manifest(output)
        previous = existing.get("encoder") or {}
        found = previous.get("fingerprint")
        if found != encoder.get("fingerprint"):
            same_directory = previous.get("directory") == encoder.get("directory")
            if same_directory and previous.get("variant") != encoder.get("variant"):
                raise EmbeddingsMismatchError(
                    f"{_name(output)!r} holds embeddings of the {previous.get('variant') or 'fp32/fp16'} variant of "
                    f"{encoder.get('directory')!r}, but this run uses its {encoder.get('variant')} variant; variants "
                    "never mix in one output. Resume with --precision "
                    f"{previous.get('variant') or 'fp32'}, or use a new --output directory"
                )
            raise EmbeddingsMismatchError(
                f"{_name(output)!r} already holds embeddings of another model (encoder "
                f"{previous.get('directory')!r}, fingerprint {str(found)[:12]}); "
                f"this encoder is {encoder.get('directory')!r} (fingerprint {str(encoder.get('fingerprint'))[:12]}). "
                "Use a new --output directory or delete the old one"
            )
        for name, value in (("dim", int(dim)), ("dtype", dtype), ("shards", plan)):
            if existing.get(name) != value:
                raise EmbeddingsMismatchError(
                    f"{_name(output)!r} was started with {name}={_short(existing.get(name))}, not {_short(value)}; "
                    "resume with the same settings or use a new --output directory"
                )
        return existing
    storage.makedirs(storage.join(output, PARTS_DIR))
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "dim": int(dim),
        "dtype": dtype,
        "encoder": encoder,
        "shards": plan,
        "complete": False,
        **extra,
    }
    _write_json_atomic(storage.join(output, MANIFEST), manifest)
    return manifest


def _short(value: Any) -> str:
    if isinstance(value, list):
        return f"[{len(value)} shard(s)]"
    return repr(value)


# -- parts ------------------------------------------------------------------------------------------


def _check_part_name(part_name: str) -> None:
    if not _PART_NAME.match(part_name) or part_name.endswith((".npy", ".parquet")):
        raise ValueError(f"part name {part_name!r} must be letters, digits, '_', '.', '-' (no extension, no '/')")


def metadata_table(
    ids: Sequence[int], keys: Sequence[str], shards: Sequence[str], labels: Sequence[int],
    label_names: Sequence[str], captions: Sequence[str],
):
    """A ``pyarrow.Table`` with the metadata columns in their canonical types and order."""
    import pyarrow as pa

    return pa.table(
        {
            "id": pa.array(list(ids), type=pa.int64()),
            "key": pa.array(list(keys), type=pa.string()),
            "shard": pa.array(list(shards), type=pa.string()),
            "label": pa.array(list(labels), type=pa.int64()),
            "label_name": pa.array(list(label_names), type=pa.string()),
            "caption": pa.array(list(captions), type=pa.string()),
        }
    )


@dataclass
class MetadataRows:
    """The metadata columns of the samples gathered for one part or batch, in ``metadata_table``'s order."""

    ids: list[int] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    label_names: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)

    def append(self, sample: Any, shard: str, classes: Sequence[str]) -> None:
        """One ``ShardSample``'s row; ``shard`` as it should be recorded, ``classes`` to name its label."""
        label = int(sample.label)
        self.ids.append(int(sample.sample_id))
        self.keys.append(sample.key)
        self.shards.append(shard)
        self.labels.append(label)
        self.label_names.append(str(classes[label]) if 0 <= label < len(classes) else "")
        self.captions.append(sample.caption)

    def table(self) -> Any:
        return metadata_table(self.ids, self.keys, self.shards, self.labels, self.label_names, self.captions)


def _check_metadata(metadata, rows: int) -> Any:
    import pyarrow as pa

    missing = [name for name in METADATA_COLUMNS if name not in metadata.column_names]
    if missing:
        raise ValueError(f"metadata lacks column(s) {missing}; expected {list(METADATA_COLUMNS)}")
    if metadata.num_rows != rows:
        raise ValueError(f"metadata has {metadata.num_rows} rows but embeddings have {rows}")
    types = {"id": pa.int64(), "label": pa.int64()}
    columns = [metadata.column(name).cast(types.get(name, pa.string())) for name in METADATA_COLUMNS]
    return pa.table(dict(zip(METADATA_COLUMNS, columns)))


def write_part(
    output_dir: str | os.PathLike, part_name: str, embeddings: np.ndarray, metadata, info: dict | None = None
) -> None:
    """Write one part atomically: ``parts/<part_name>.npy`` (in the manifest's dtype) and ``.parquet``.

    ``embeddings`` is [n, D] (any float dtype; cast to the manifest's), ``metadata`` a ``pyarrow.Table``
    with the ``METADATA_COLUMNS`` and n rows. The directory must have been opened with ``open_output``.
    ``info`` (JSON-able, optional) is kept in the parquet file's metadata; ``part_info`` reads it back.
    Rewriting an existing part replaces it.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    _check_part_name(part_name)
    output = os.fspath(output_dir)
    manifest = read_manifest(output)
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2 or embeddings.shape[1] != int(manifest["dim"]):
        raise ValueError(f"embeddings of shape {embeddings.shape} do not match dim {manifest['dim']} "
                         f"of {_name(output)}")
    table = _check_metadata(metadata, len(embeddings))
    if info is not None:
        table = table.replace_schema_metadata({_PART_INFO_KEY: json.dumps(info)})
    parts = storage.join(output, PARTS_DIR)
    storage.makedirs(parts)
    vectors = io.BytesIO()
    np.save(vectors, np.ascontiguousarray(embeddings, dtype=manifest["dtype"]))
    parquet = pa.BufferOutputStream()
    pq.write_table(table, parquet)
    storage.write_bytes(storage.join(parts, f"{part_name}.npy"), vectors.getvalue())
    storage.write_bytes(storage.join(parts, f"{part_name}.parquet"), parquet.getvalue().to_pybytes())  # the commit


def part_names(path: str | os.PathLike) -> list[str]:
    """Committed part names in global order."""
    return sorted(name[: -len(".parquet")] for name in storage.listdir(storage.join(path, PARTS_DIR))
                  if name.endswith(".parquet") and not name.startswith("."))


def _part_file(path: str | os.PathLike, part_name: str, suffix: str) -> str:
    return storage.join(path, PARTS_DIR, f"{part_name}{suffix}")


def _read_parquet(path: str | os.PathLike, part_name: str, reader):
    """``reader(file)`` on a part's parquet: a local path, or an open (seekable, ranged) remote file."""
    location = _part_file(path, part_name, ".parquet")
    if not storage.is_url(location):
        return reader(location)
    with storage.open_read(location) as handle:
        return reader(handle)


def part_info(path: str | os.PathLike, part_name: str) -> dict:
    """The ``info`` dictionary given to ``write_part`` for this part (``{}`` when none)."""
    import pyarrow.parquet as pq

    schema = _read_parquet(path, part_name, pq.read_schema)
    raw = (schema.metadata or {}).get(_PART_INFO_KEY.encode())
    return json.loads(raw) if raw else {}


def part_rows(path: str | os.PathLike, part_name: str) -> int:
    """Number of rows of one committed part (read from its parquet footer)."""
    import pyarrow.parquet as pq

    return int(_read_parquet(path, part_name, pq.read_metadata).num_rows)


def _total_rows(path: str | os.PathLike, names: Sequence[str]) -> int:
    """Rows over the parts ``names``; the footers of remote parts are read several at a time."""
    if storage.is_url(os.fspath(path)) and len(names) > 1:
        with ThreadPoolExecutor(max_workers=min(16, len(names))) as pool:
            return sum(pool.map(lambda name: part_rows(path, name), names))
    return sum(part_rows(path, name) for name in names)


def read_part(path: str | os.PathLike, part_name: str, normalize: bool = True):
    """``(float32 [n, D], pyarrow.Table)`` of one part; rows re-normalised to unit length by default."""
    import pyarrow.parquet as pq

    location = _part_file(path, part_name, ".npy")
    if storage.is_url(location):
        vectors = np.load(io.BytesIO(storage.read_bytes(location)))
    else:
        vectors = np.load(location, mmap_mode="r")
    table = _read_parquet(path, part_name, pq.read_table)
    if len(vectors) != table.num_rows:
        raise EmbeddingsError(f"part {part_name} of {_name(path)}: {len(vectors)} embeddings but "
                              f"{table.num_rows} metadata rows")
    vectors = l2_normalize(vectors) if normalize else np.asarray(vectors, dtype=np.float32)
    return np.ascontiguousarray(vectors, dtype=np.float32), table


# -- shard bookkeeping (used by the extractor) ------------------------------------------------------


def mark_shard_done(output_dir: str | os.PathLike, shard_index: int, record: dict) -> None:
    """Record that shard ``shard_index`` of the plan is fully written (``record``: counts, skipped keys)."""
    done = storage.join(output_dir, DONE_DIR)
    storage.makedirs(done)
    _write_json_atomic(storage.join(done, f"{shard_index:06d}.json"), record)


def done_shards(path: str | os.PathLike) -> dict[int, dict]:
    """``{shard index: done record}`` for the finished shards of ``path`` (remote records are read in parallel)."""
    done = storage.join(path, DONE_DIR)
    names = [name for name in storage.listdir(done) if name[:1].isdigit() and name.endswith(".json")]

    def load(name: str) -> dict:
        return json.loads(storage.read_bytes(storage.join(done, name)).decode("utf-8"))

    if storage.is_url(done) and len(names) > 1:
        with ThreadPoolExecutor(max_workers=min(16, len(names))) as pool:
            loaded = list(pool.map(load, names))
    else:
        loaded = [load(name) for name in names]
    return {int(name[: -len(".json")]): record for name, record in zip(names, loaded)}


def finalize(path: str | os.PathLike) -> dict:
    """Mark ``path`` complete in its manifest (idempotent); returns the updated manifest.

    With a shard plan, raises ``EmbeddingsError`` unless every planned shard has its done record.
    Adds ``count`` and ``skipped`` totals.
    """
    output = os.fspath(path)
    manifest = read_manifest(output)
    records = done_shards(output)
    if manifest.get("shards") is not None:
        missing = [i for i in range(len(manifest["shards"])) if i not in records]
        if missing:
            raise EmbeddingsError(f"{_name(output)}: {len(missing)} shard(s) not finished yet "
                                  f"(e.g. index {missing[0]})")
    manifest["count"] = _total_rows(output, part_names(output))
    manifest["skipped"] = sum(int(record.get("skipped", 0)) for record in records.values())
    manifest["complete"] = True
    _write_json_atomic(storage.join(output, MANIFEST), manifest)  # last: the directory's commit point
    return manifest


# -- reading --------------------------------------------------------------------------------------


def embeddings_info(path: str | os.PathLike) -> dict:
    """Summary of an embeddings directory.

    Keys: ``dim`` (int), ``count`` (rows in committed parts), ``dtype`` (stored dtype), ``encoder``
    (``{"fingerprint", "variant", "image_model", "provider", "directory", "preprocess"}``: the encoder's
    identity, see ``encoder_identity``; manifests written before variants were recorded lack the middle three),
    ``complete`` (bool), ``parts`` (number), ``shards`` (plan or None), ``shards_done``, ``skipped``
    (undecodable samples in finished shards), ``path`` (absolute, or the URL without credentials).
    """
    output = os.fspath(path)
    manifest = read_manifest(output)
    names = part_names(output)
    records = done_shards(output)
    plan = manifest.get("shards")
    complete = bool(manifest.get("complete")) or (plan is not None and all(i in records for i in range(len(plan))))
    return {
        "path": _name(output) if storage.is_url(output) else str(Path(output).resolve()),
        "dim": int(manifest["dim"]),
        "dtype": manifest["dtype"],
        "count": _total_rows(output, names),
        "encoder": manifest.get("encoder", {}),
        "complete": complete,
        "parts": len(names),
        "shards": plan,
        "shards_done": len(records),
        "skipped": sum(int(record.get("skipped", 0)) for record in records.values()),
    }


def read_embeddings(
    path: str | os.PathLike, allow_incomplete: bool = False, normalize: bool = True
) -> Iterator[tuple[np.ndarray, Any]]:
    """Yield ``(float32 [n, D], pyarrow.Table of n metadata rows)`` per part, in the stable global order.

    Raises ``EmbeddingsError`` for a directory that is not complete (an extraction still running or
    interrupted) unless ``allow_incomplete``. Rows are re-normalised to unit length (float16 storage
    leaves norms within ~1e-3 of 1) unless ``normalize=False``.
    """
    info = embeddings_info(path)
    if not info["complete"] and not allow_incomplete:
        raise EmbeddingsError(
            f"embeddings in {_name(path)!r} are incomplete ({info['shards_done']} of "
            f"{len(info['shards'] or [])} shard(s) done); finish the extraction (it resumes) first"
        )
    for name in part_names(path):
        vectors, table = read_part(path, name, normalize=normalize)
        if vectors.shape[1] != info["dim"]:
            raise EmbeddingsError(f"part {name} of {_name(path)} has dim {vectors.shape[1]}, "
                                  f"manifest says {info['dim']}")
        yield vectors, table


def read_all(path: str | os.PathLike, allow_incomplete: bool = False):
    """All embeddings as one ``(float32 [N, D], pyarrow.Table)``, in the global order."""
    import pyarrow as pa

    info = embeddings_info(path)
    blocks = list(read_embeddings(path, allow_incomplete=allow_incomplete))
    if not blocks:
        return np.zeros((0, info["dim"]), dtype=np.float32), metadata_table([], [], [], [], [], [])
    return np.concatenate([v for v, _ in blocks]), pa.concat_tables([t for _, t in blocks])
