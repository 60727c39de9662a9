"""Safe-by-default serving: basic-auth parsing, the upload size limit, what Gradio may serve.

* The app binds 127.0.0.1 unless ``--host`` says otherwise, and never makes a share link.
* ``--auth user:pass`` (or ``MANYVIEW_AUTH=user:pass``; several pairs separated by commas) turns on
  Gradio's login page. The password may contain ':' (the first ':' separates).
* Uploads larger than ``--max-upload`` (25 MB by default) are refused by Gradio before they reach
  Python; images above ``app.search.MAX_QUERY_PIXELS`` pixels are refused before decoding.
* Files: Gradio serves only what it wrote itself (its cache of result thumbnails and uploads, under
  ``GRADIO_TEMP_DIR``) plus ``allowed_paths``. The app passes no ``allowed_paths`` at all (thumbnails are
  read from the shards in Python and handed over as images), and blocks the encoder, index and shard
  directories explicitly, so no file under them, nor anywhere else, is reachable by URL.
"""
from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Iterable

AUTH_ENV = "MANYVIEW_AUTH"
DEFAULT_MAX_UPLOAD = "25mb"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kb|mb|gb)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3}


class SafetyError(ValueError):
    """A bad ``--auth`` or ``--max-upload`` value (reported as one ``error:`` line)."""


def parse_auth(text: str | None) -> list[tuple[str, str]]:
    """``"alice:secret,bob:pa:ss"`` -> ``[("alice", "secret"), ("bob", "pa:ss")]``; ``[]`` for None/blank."""
    if text is None or not text.strip():
        return []
    pairs = []
    for item in text.split(","):
        user, separator, password = item.strip().partition(":")
        if not separator or not user.strip() or not password:
            raise SafetyError("auth must be user:password (several separated by commas), with a non-empty user and password")
        pairs.append((user.strip(), password))
    return pairs


def auth_from(argument: str | None, environ: dict | None = None) -> list[tuple[str, str]]:
    """The flag wins over ``MANYVIEW_AUTH``."""
    environ = os.environ if environ is None else environ
    return parse_auth(argument if argument is not None else environ.get(AUTH_ENV))


def parse_size(text: str | int) -> int:
    """``"25mb"`` -> 25,000,000 bytes (b, kb, mb, gb; decimal units as Gradio counts them)."""
    if isinstance(text, int):
        if text <= 0:
            raise SafetyError("the upload limit must be positive")
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise SafetyError(f"cannot read the size {text!r}; write e.g. 25mb, 500kb or 2000000")
    size = int(float(match.group(1)) * _UNITS[(match.group(2) or "b").lower()])
    if size <= 0:
        raise SafetyError("the upload limit must be positive")
    return size


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, auth: list) -> str | None:
    """A warning line when the app would be reachable from other machines without a login."""
    if is_loopback(host) or auth:
        return None
    return (f"warning: serving on {host} without --auth: anyone who can reach this machine can search the "
            f"collection (set --auth user:pass or {AUTH_ENV})")


def blocked_paths(*directories: str | os.PathLike | None, shards: Iterable[str] = ()) -> list[str]:
    """Absolute directories Gradio must never serve from: the encoder and index directories and the shards'."""
    found: list[str] = []
    for path in [*directories, *(os.path.dirname(shard) for shard in shards)]:
        if path:
            resolved = str(Path(path).expanduser().resolve())
            if resolved not in found:
                found.append(resolved)
    return found


def inside(path: str | os.PathLike, roots: Iterable[str | os.PathLike]) -> bool:
    """Whether ``path`` (symlinks and '..' resolved) lies inside one of ``roots``."""
    target = Path(path).expanduser().resolve()
    for root in roots:
        base = Path(root).expanduser().resolve()
        if target == base or base in target.parents:
            return True
    return False
