"""Torch-free access to paths that may be URLs: local files, fsspec URLs and ``pipe:`` commands.

Every data and output path of the project (training shards, extraction input and output, index build input
and output) may be a local path, a URL that fsspec understands (``s3://``, ``gs://``, ``http(s)://``, ...)
or, for reading only, ``pipe:COMMAND`` (the command's standard output is the file, as in WebDataset).

Credentials never come from flags or from the URL: the fsspec backends read the usual environment variables
and config files (s3fs: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` /
``AWS_PROFILE`` and ``~/.aws/``, ``AWS_ENDPOINT_URL`` for an S3-compatible server; gcsfs:
``GOOGLE_APPLICATION_CREDENTIALS`` or gcloud's default login; any backend: fsspec's ``FSSPEC_<PROTOCOL>_<KWARG>``
variables). ``public(text)`` strips ``user:password@`` and query strings (where presigned URLs carry their
signature) from every URL in a string: what is logged, raised or written into JSON goes through it.

Writes put one object (``write_bytes``, ``upload``): one PUT on an object store, which is atomic, and a
temporary file renamed over the target on local disk. Commit protocols (``export.embeddings``,
``index.store``) order their writes so that the object that commits comes last.
"""
from __future__ import annotations

import io
import os
import posixpath
import re
import shutil
import subprocess
import uuid
from typing import IO, Any, Callable

PIPE = "pipe:"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_CREDENTIALS = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s'\"]*@")
_QUERY = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s?#'\"]*)[?#][^\s'\"]*")
_WILDCARDS = "*?["
# Which package each protocol needs, for the error that says what to install.
_BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp", "https": "aiohttp",
             "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs"}


class StorageError(ValueError):
    """A URL that cannot be used as asked: unknown protocol, missing backend package, refused access."""


def is_url(path: str | os.PathLike) -> bool:
    """True for ``pipe:`` commands and ``scheme://`` URLs, false for local paths."""
    text = os.fspath(path)
    return text.startswith(PIPE) or _SCHEME.match(text) is not None


def is_pipe(path: str | os.PathLike) -> bool:
    return os.fspath(path).startswith(PIPE)


def protocol(path: str | os.PathLike) -> str:
    """``"s3"``, ``"gs"``, ``"https"``..., ``"pipe"`` or ``"file"`` (local paths)."""
    text = os.fspath(path)
    if text.startswith(PIPE):
        return "pipe"
    match = _SCHEME.match(text)
    return match.group(1).lower() if match else "file"


def public(text: str | os.PathLike) -> str:
    """``text`` with every URL's ``user:password@`` and query string / fragment removed (safe to log)."""
    return _QUERY.sub(r"\1", _CREDENTIALS.sub(r"\1", os.fspath(text)))


def absolute(path: str | os.PathLike) -> str:
    """A local path made absolute (``~`` expanded); URLs and ``pipe:`` commands unchanged."""
    text = os.fspath(path)
    return text if is_url(text) else os.path.abspath(os.path.expanduser(text))


def join(base: str | os.PathLike, *names: str) -> str:
    """``base/name/...`` for URLs and local paths alike."""
    text = os.fspath(base)
    if is_url(text):
        return "/".join([text.rstrip("/"), *[name.strip("/") for name in names]])
    return os.path.join(text, *names)


def dirname(path: str | os.PathLike) -> str:
    text = os.fspath(path)
    return posixpath.dirname(text.rstrip("/")) if is_url(text) else os.path.dirname(text)


def basename(path: str | os.PathLike) -> str:
    text = os.fspath(path)
    return posixpath.basename(text.split("?", 1)[0].rstrip("/")) if is_url(text) else os.path.basename(text)


def has_wildcard(path: str) -> bool:
    return any(character in path for character in _WILDCARDS)


def filesystem(url: str) -> tuple[Any, str]:
    """``(fsspec filesystem, path inside it)`` for a URL; ``StorageError`` naming the package to install."""
    import fsspec.core

    scheme = protocol(url)
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as error:
        package = _BACKENDS.get(scheme, f"the fsspec backend for {scheme}://")
        raise StorageError(f"{public(url)}: {scheme}:// URLs need {package} (pip install {package}, or "
                           "pip install 'manyview[storage]')") from error
    except ValueError as error:
        raise StorageError(f"{public(url)}: {public(str(error))}") from error


def _failure(url: str, action: str, error: BaseException) -> Exception:
    """The exception to raise for a backend error: ``FileNotFoundError`` stays one, the rest say what to check."""
    if isinstance(error, FileNotFoundError):
        return FileNotFoundError(f"{public(url)} does not exist")
    hint = ""
    if protocol(url) in ("s3", "s3a"):
        hint = ("; check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE, ~/.aws/) and, for "
                "an S3-compatible server, AWS_ENDPOINT_URL")
    elif protocol(url) in ("gs", "gcs"):
        hint = "; check the credentials (GOOGLE_APPLICATION_CREDENTIALS or `gcloud auth application-default login`)"
    return StorageError(f"cannot {action} {public(url)}: {type(error).__name__}: {public(str(error))}{hint}")


# -- reading ----------------------------------------------------------------------------------------


class _PipeStream(io.RawIOBase):
    """The standard output of ``pipe:COMMAND`` as a readable binary stream; a failing command raises on close."""

    def __init__(self, url: str):
        super().__init__()
        self.url = url
        self._process = subprocess.Popen(url[len(PIPE):], shell=True, stdout=subprocess.PIPE)
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self._process.stdout.readinto(buffer)
        self._eof = self._eof or count == 0
        return count

    def close(self) -> None:
        if self.closed:
            return
        self._process.stdout.close()
        if not self._eof:  # closed early: the command need not run on
            self._process.terminate()
        status = self._process.wait()
        super().close()
        if self._eof and status != 0:
            raise OSError(f"{public(self.url)} exited with status {status}")


def open_read(path: str | os.PathLike) -> IO[bytes]:
    """A binary stream of a local file, an fsspec URL or a ``pipe:`` command's output (close it when done).

    Raises ``FileNotFoundError`` naming the (credential-free) URL when it does not exist."""
    text = os.fspath(path)
    if is_pipe(text):
        return io.BufferedReader(_PipeStream(text), buffer_size=1 << 20)
    if not is_url(text):
        return open(text, "rb")
    fs, inner = filesystem(text)
    try:
        return fs.open(inner, "rb")
    except Exception as error:  # backends raise their own types (botocore, aiohttp, google.auth)
        raise _failure(text, "read", error) from error


def read_bytes(path: str | os.PathLike) -> bytes:
    with open_read(path) as handle:
        return handle.read()


def _look_up(url: str, question: str) -> bool:
    """``fs.exists`` / ``fs.isdir`` of ``url``, never answered from fsspec's listing cache."""
    fs, inner = filesystem(url)
    try:
        fs.invalidate_cache(inner)
        return bool(getattr(fs, question)(inner))
    except Exception as error:
        raise _failure(url, "look up", error) from error


def exists(path: str | os.PathLike) -> bool:
    text = os.fspath(path)
    if not is_url(text):
        return os.path.exists(text)
    return True if is_pipe(text) else _look_up(text, "exists")


def isdir(path: str | os.PathLike) -> bool:
    """A local directory, or a URL prefix that holds objects."""
    text = os.fspath(path)
    if not is_url(text):
        return os.path.isdir(text)
    return False if is_pipe(text) else _look_up(text, "isdir")


def listdir(path: str | os.PathLike) -> list[str]:
    """Sorted names of the entries directly under ``path`` (``[]`` when it does not exist); never cached."""
    text = os.fspath(path)
    if not is_url(text):
        return sorted(os.listdir(text)) if os.path.isdir(text) else []
    fs, inner = filesystem(text)
    try:
        fs.invalidate_cache(inner)
        entries = fs.ls(inner, detail=False)
    except FileNotFoundError:
        return []
    except Exception as error:
        raise _failure(text, "list", error) from error
    names = [posixpath.basename(str(entry).rstrip("/")) for entry in entries]
    return sorted(name for name in names if name)


def glob(pattern: str) -> list[str]:
    """Sorted paths matching a glob (``s3://bucket/dir/*.tar``, ``/data/train-*.tar``), as full URLs."""
    if not is_url(pattern):
        import glob as local_glob

        return sorted(local_glob.glob(pattern))
    fs, inner = filesystem(pattern)
    try:
        fs.invalidate_cache()
        found = fs.glob(inner)
    except FileNotFoundError:
        return []
    except Exception as error:
        raise _failure(pattern, "list", error) from error
    return sorted(fs.unstrip_protocol(str(match)) for match in found)


# -- writing ----------------------------------------------------------------------------------------


def _temporary(path: str) -> str:
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def replace_local(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write the local file ``path`` whole: ``write(temporary)`` fills a uniquely named file beside it, which is then
    renamed onto ``path``, so readers see the old file or the new one, never a part. The temporary file is removed
    when ``write`` or the rename fails (the error propagates), so a failed write leaves nothing behind."""
    text = os.fspath(path)
    temporary = _temporary(text)
    try:
        write(temporary)
        os.replace(temporary, text)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def makedirs(path: str | os.PathLike) -> None:
    """Create a local directory and its parents; nothing to do on object stores (prefixes need no creation)."""
    text = os.fspath(path)
    if is_pipe(text):
        raise StorageError(f"cannot write to {public(text)}: pipe: paths are for reading")
    if not is_url(text):
        os.makedirs(text, exist_ok=True)


def _write_whole(text: str, write_local: Callable[[str], None], write_remote: Callable[[Any, str], None]) -> None:
    """Write one file or object so that readers see the old content or the new one, never a part: locally through
    ``write_local(temporary path)`` and a rename, on object stores through ``write_remote(filesystem, path)``."""
    if is_pipe(text):
        raise StorageError(f"cannot write to {public(text)}: pipe: paths are for reading")
    if not is_url(text):
        replace_local(text, write_local)
        return
    fs, inner = filesystem(text)
    try:
        write_remote(fs, inner)
        fs.invalidate_cache(posixpath.dirname(inner))
    except Exception as error:
        raise _failure(text, "write", error) from error


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write one file/object whole: readers see the old content or the new one, never a part."""

    def write_local(temporary: str) -> None:
        with open(temporary, "wb") as handle:
            handle.write(data)

    _write_whole(os.fspath(path), write_local, lambda fs, inner: fs.pipe_file(inner, bytes(data)))


def upload(local_file: str | os.PathLike, path: str | os.PathLike) -> None:
    """Copy a local file to ``path`` as one object (one PUT, or a local copy renamed into place)."""
    _write_whole(os.fspath(path), lambda temporary: shutil.copyfile(local_file, temporary),
                 lambda fs, inner: fs.put_file(os.fspath(local_file), inner))


def download(path: str | os.PathLike, local_file: str | os.PathLike) -> None:
    """Copy ``path`` (URL or local) to ``local_file`` through a temporary name."""
    def copy(temporary: str) -> None:
        with open_read(path) as source, open(temporary, "wb") as target:
            shutil.copyfileobj(source, target, 1 << 22)

    replace_local(local_file, copy)


def remove(path: str | os.PathLike) -> None:
    """Delete one file/object; nothing when it is already gone."""
    text = os.fspath(path)
    if not is_url(text):
        if os.path.exists(text):
            os.unlink(text)
        return
    fs, inner = filesystem(text)
    try:
        fs.rm_file(inner)
    except FileNotFoundError:
        pass
    except Exception as error:
        raise _failure(text, "delete", error) from error


def describe(path: str | os.PathLike) -> str:
    """How to name ``path`` in logs and JSON: an absolute local path, or the URL without credentials."""
    text = os.fspath(path)
    return public(text) if is_url(text) else absolute(text)

