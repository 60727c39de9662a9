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
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from export.contract import l2_normalize, preprocess_path, read_json_object, read_preprocess, variant_files

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


def _write_json_atomic(path: Path, data: dict) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def read_manifest(path: str | os.PathLike) -> dict:
    """The parsed ``embeddings.json`` of ``path``; ``EmbeddingsError`` when absent or not this format."""
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        raise EmbeddingsError(f"{str(path)!r} is not an embeddings directory (no {MANIFEST})")
    manifest = read_json_object(manifest_path, EmbeddingsError, "embeddings")
    if manifest.get("format") != FORMAT:
        raise EmbeddingsError(f"{manifest_path} is not a {FORMAT} manifest")
    if int(manifest.get("version", 0)) > VERSION:
        raise EmbeddingsError(f"{manifest_path} has format version {manifest.get('version')}; this code reads <= {VERSION}")
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

    ``encoder`` is ``encoder_identity(...)``. ``shards`` is the ordered shard plan (absolute paths); part
    ``NNNNNN-*`` belongs to ``shards[NNNNNN]``. Raises ``EmbeddingsMismatchError`` when the directory
    holds embeddings of another encoder, dim, dtype or shard plan. Safe to call from several processes
    at once (they all write the same content). Returns the manifest.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    output = Path(output_dir)
    plan = [os.path.abspath(shard) for shard in shards] if shards is not None else None
    if (output / MANIFEST).exists():
        existing = read_manifest(output)
        previous = existing.get("encoder") or {}
        found = previous.get("fingerprint")
        if found != encoder.get("fingerprint"):
            if previous.get("directory") == encoder.get("directory") and previous.get("variant") != encoder.get("variant"):
                raise EmbeddingsMismatchError(
                    f"{str(output)!r} holds embeddings of the {previous.get('variant') or 'fp32/fp16'} variant of "
                    f"{encoder.get('directory')!r}, but this run uses its {encoder.get('variant')} variant; variants "
                    "never mix in one output. Resume with --precision "
                    f"{previous.get('variant') or 'fp32'}, or use a new --output directory"
                )
            raise EmbeddingsMismatchError(
                f"{str(output)!r} already holds embeddings of another model (encoder "
                f"{previous.get('directory')!r}, fingerprint {str(found)[:12]}); "
                f"this encoder is {encoder.get('directory')!r} (fingerprint {str(encoder.get('fingerprint'))[:12]}). "
                "Use a new --output directory or delete the old one"
            )
        for name, value in (("dim", int(dim)), ("dtype", dtype), ("shards", plan)):
            if existing.get(name) != value:
                raise EmbeddingsMismatchError(
                    f"{str(output)!r} was started with {name}={_short(existing.get(name))}, not {_short(value)}; "
                    "resume with the same settings or use a new --output directory"
                )
        return existing
    output.mkdir(parents=True, exist_ok=True)
    (output / PARTS_DIR).mkdir(exist_ok=True)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "dim": int(dim),
        "dtype": dtype,
        "encoder": encoder,
        "shards": plan,
        "complete": False,
        **(extra or {}),
    }
    _write_json_atomic(output / MANIFEST, manifest)
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
    import pyarrow.parquet as pq

    _check_part_name(part_name)
    output = Path(output_dir)
    manifest = read_manifest(output)
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2 or embeddings.shape[1] != int(manifest["dim"]):
        raise ValueError(f"embeddings of shape {embeddings.shape} do not match dim {manifest['dim']} of {output}")
    table = _check_metadata(metadata, len(embeddings))
    if info is not None:
        table = table.replace_schema_metadata({_PART_INFO_KEY: json.dumps(info)})
    parts = output / PARTS_DIR
    parts.mkdir(exist_ok=True)
    tag = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    npy_tmp, parquet_tmp = parts / f".{part_name}.npy{tag}", parts / f".{part_name}.parquet{tag}"
    try:
        with open(npy_tmp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(embeddings, dtype=manifest["dtype"]))
        pq.write_table(table, str(parquet_tmp))
        os.replace(npy_tmp, parts / f"{part_name}.npy")
        os.replace(parquet_tmp, parts / f"{part_name}.parquet")  # last: the part's commit point
    finally:
        for temporary in (npy_tmp, parquet_tmp):
            if temporary.exists():
                temporary.unlink()


def part_names(path: str | os.PathLike) -> list[str]:
    """Committed part names in global order."""
    parts = Path(path) / PARTS_DIR
    if not parts.is_dir():
        return []
    return sorted(entry.name[: -len(".parquet")] for entry in parts.iterdir()
                  if entry.name.endswith(".parquet") and not entry.name.startswith("."))


def part_info(path: str | os.PathLike, part_name: str) -> dict:
    """The ``info`` dictionary given to ``write_part`` for this part (``{}`` when none)."""
    import pyarrow.parquet as pq

    schema = pq.read_schema(str(Path(path) / PARTS_DIR / f"{part_name}.parquet"))
    raw = (schema.metadata or {}).get(_PART_INFO_KEY.encode())
    return json.loads(raw) if raw else {}


def part_rows(path: str | os.PathLike, part_name: str) -> int:
    """Number of rows of one committed part (read from its parquet footer)."""
    import pyarrow.parquet as pq

    return int(pq.read_metadata(str(Path(path) / PARTS_DIR / f"{part_name}.parquet")).num_rows)


def read_part(path: str | os.PathLike, part_name: str, normalize: bool = True):
    """``(float32 [n, D], pyarrow.Table)`` of one part; rows re-normalised to unit length by default."""
    import pyarrow.parquet as pq

    base = Path(path) / PARTS_DIR
    vectors = np.load(base / f"{part_name}.npy", mmap_mode="r")
    table = pq.read_table(str(base / f"{part_name}.parquet"))
    if len(vectors) != table.num_rows:
        raise EmbeddingsError(f"part {part_name} of {path}: {len(vectors)} embeddings but {table.num_rows} metadata rows")
    vectors = l2_normalize(vectors) if normalize else np.asarray(vectors, dtype=np.float32)
    return np.ascontiguousarray(vectors, dtype=np.float32), table


# -- shard bookkeeping (used by the extractor) ------------------------------------------------------


def mark_shard_done(output_dir: str | os.PathLike, shard_index: int, record: dict) -> None:
    """Record that shard ``shard_index`` of the plan is fully written (``record``: counts, skipped keys)."""
    done = Path(output_dir) / DONE_DIR
    done.mkdir(exist_ok=True)
    _write_json_atomic(done / f"{shard_index:06d}.json", record)


def done_shards(path: str | os.PathLike) -> dict[int, dict]:
    """``{shard index: done record}`` for the finished shards of ``path``."""
    done = Path(path) / DONE_DIR
    records: dict[int, dict] = {}
    if done.is_dir():
        for entry in sorted(done.glob("[0-9]*.json")):
            with open(entry, encoding="utf-8") as handle:
                records[int(entry.stem)] = json.load(handle)
    return records


def finalize(path: str | os.PathLike) -> dict:
    """Mark ``path`` complete in its manifest (idempotent); returns the updated manifest.

    With a shard plan, raises ``EmbeddingsError`` unless every planned shard has its done record.
    Adds ``count`` and ``skipped`` totals.
    """
    output = Path(path)
    manifest = read_manifest(output)
    records = done_shards(output)
    if manifest.get("shards") is not None:
        missing = [i for i in range(len(manifest["shards"])) if i not in records]
        if missing:
            raise EmbeddingsError(f"{output}: {len(missing)} shard(s) not finished yet (e.g. index {missing[0]})")
    manifest["count"] = sum(part_rows(output, name) for name in part_names(output))
    manifest["skipped"] = sum(int(record.get("skipped", 0)) for record in records.values())
    manifest["complete"] = True
    _write_json_atomic(output / MANIFEST, manifest)
    return manifest


# -- reading --------------------------------------------------------------------------------------


def embeddings_info(path: str | os.PathLike) -> dict:
    """Summary of an embeddings directory.

    Keys: ``dim`` (int), ``count`` (rows in committed parts), ``dtype`` (stored dtype), ``encoder``
    (``{"fingerprint", "variant", "image_model", "provider", "directory", "preprocess"}``: the encoder's
    identity, see ``encoder_identity``; manifests written before variants were recorded lack the middle three),
    ``complete`` (bool), ``parts`` (number), ``shards`` (plan or None), ``shards_done``, ``skipped``
    (undecodable samples in finished shards), ``path``.
    """
    output = Path(path)
    manifest = read_manifest(output)
    names = part_names(output)
    records = done_shards(output)
    plan = manifest.get("shards")
    complete = bool(manifest.get("complete")) or (plan is not None and all(i in records for i in range(len(plan))))
    return {
        "path": str(output.resolve()),
        "dim": int(manifest["dim"]),
        "dtype": manifest["dtype"],
        "count": sum(part_rows(output, name) for name in names),
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
            f"embeddings in {str(path)!r} are incomplete ({info['shards_done']} of "
            f"{len(info['shards'] or [])} shard(s) done); finish the extraction (it resumes) first"
        )
    for name in part_names(path):
        vectors, table = read_part(path, name, normalize=normalize)
        if vectors.shape[1] != info["dim"]:
            raise EmbeddingsError(f"part {name} of {path} has dim {vectors.shape[1]}, manifest says {info['dim']}")
        yield vectors, table


def read_all(path: str | os.PathLike, allow_incomplete: bool = False):
    """All embeddings as one ``(float32 [N, D], pyarrow.Table)``, in the global order."""
    import pyarrow as pa

    info = embeddings_info(path)
    blocks = list(read_embeddings(path, allow_incomplete=allow_incomplete))
    if not blocks:
        return np.zeros((0, info["dim"]), dtype=np.float32), metadata_table([], [], [], [], [], [])
    return np.concatenate([v for v, _ in blocks]), pa.concat_tables([t for _, t in blocks])
