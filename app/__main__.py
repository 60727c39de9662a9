"""``python -m app --encoder RUN/onnx --index RUN/index [--host 127.0.0.1] [--port 7860]``.

    [--text-index RUN/caption-index]                       a caption index (``python -m app.caption_index``)
    [--compare-encoder B/onnx --compare-index B/index]     a second pair for the Compare tab
    [--auth user:pass] (or MANYVIEW_AUTH)  [--max-upload 25mb]  [--map-points 2000]  [--metrics RUN/metrics.jsonl]
    [--map-limit 1000000]                 the map draws every point up to this many
    [--precision auto|fp32|fp16|int8]   encoder variant (auto: fp16 on a GPU, int8 on a CPU, when exported)

Serves the app (``app.ui``) and its search API (``app.api``: Gradio endpoints ``/search_text``,
``/search_image``, ``/search_id`` and JSON under ``/api/v1``, behind the same ``--auth``) on ONNX + FAISS
only. Binds 127.0.0.1 unless told otherwise and never creates a public share link. Problems a user can fix (a missing directory, an encoder/index pair of
different dimensions) are reported as one ``error: ...`` line and exit status 2, not as a traceback.
The startup lines name the variant and execution provider each encoder runs; the page shows them too.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
from typing import Any, Sequence

from app.collection import MAP_LIMIT, MAP_POINTS
from app.safety import AUTH_ENV, DEFAULT_MAX_UPLOAD, SafetyError, auth_from, blocked_paths, exposure_warning, parse_size

EXIT_USAGE = 2


class AppError(RuntimeError):
    """A configuration problem to report to the user as one line."""


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (no ``--share``: the app is for local or reverse-proxied use)."""
    parser = argparse.ArgumentParser(prog="python -m app", description="Search an image index in the browser.")
    parser.add_argument("--encoder", required=True, help="ONNX encoder directory (from `python -m export`)")
    parser.add_argument("--index", required=True, help="index directory (from `python -m index.build`)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port to bind (default 7860)")
    parser.add_argument("--title", default="manyview search", help="page title")
    parser.add_argument("--text-index", help="a caption-embedding index of the same samples (python -m app.caption_index)")
    parser.add_argument("--compare-encoder", help="second ONNX encoder directory, for the Compare tab")
    parser.add_argument("--compare-index", help="index built with --compare-encoder, for the Compare tab")
    parser.add_argument("--auth", default=None, help=f"user:password for a login page; several pairs separated by commas. "
                        f"{AUTH_ENV}=user:password does the same without showing the password in the process list")
    parser.add_argument("--max-upload", default=DEFAULT_MAX_UPLOAD, help="largest accepted upload (default 25mb)")
    parser.add_argument("--map-points", type=int, default=MAP_POINTS,
                        help="images sampled for the diagnostics (default 2000)")
    parser.add_argument("--map-limit", type=int, default=MAP_LIMIT,
                        help="the map draws every indexed point up to this many, a fixed random subset beyond "
                        "(default 1000000)")
    parser.add_argument("--metrics", default=None, help="metrics.jsonl of the training run (default: next to the encoder)")
    parser.add_argument("--precision", choices=["auto", "fp32", "fp16", "int8"], default="auto",
                        help="encoder variant (auto: fp16 on a GPU, int8 on a CPU, when exported; fp32 refuses int8)")
    return parser


def _require_dir(path: str, what: str, producer: str) -> None:
    if not os.path.exists(path):
        raise AppError(f"{what} directory {path} does not exist (make it with `{producer}`)")
    if not os.path.isdir(path):
        raise AppError(f"{what} path {path} is not a directory")


def load_encoder(path: str, precision: str = "auto") -> Any:
    """``export.runtime.Encoder(path, precision=precision)``, with failures turned into ``AppError``."""
    _require_dir(path, "encoder", "python -m export --model RUN/model --output RUN/onnx")
    from export.runtime import Encoder

    try:
        return Encoder(path, precision=precision)
    except Exception as error:  # onnxruntime and JSON errors vary; report them in one line
        raise AppError(f"cannot load encoder {path}: {type(error).__name__}: {error}") from error


def local_index(path: str) -> str:
    """``path`` for a local index directory; for a URL (``s3://...``), the local cache directory it was downloaded
    to (``index.store.local_copy``: only the files of a generation it does not hold yet are downloaded)."""
    from index.store import local_copy
    from trainer.data.storage import is_url, public

    if not is_url(path):
        return path
    try:
        return local_copy(path)
    except (OSError, ValueError) as error:
        raise AppError(f"cannot download index {public(path)}: {error}") from error


def load_index(path: str) -> Any:
    """``index.search.Index.load(path)``, with failures turned into ``AppError``."""
    _require_dir(path, "index", "python -m index.build --encoder RUN/onnx --data ... --output RUN/index")
    from index.search import Index

    try:
        return Index.load(path)
    except Exception as error:  # FAISS and JSON errors vary; report them in one line
        raise AppError(f"cannot load index {path}: {type(error).__name__}: {error}") from error


def check_compatible(encoder: Any, index: Any, encoder_path: str, index_path: str) -> None:
    """Raise ``AppError`` when the encoder's embedding size differs from the index's vectors."""
    if int(encoder.dim) != int(index.dim):
        raise AppError(
            f"encoder {encoder_path} gives {encoder.dim}-d embeddings but index {index_path} holds "
            f"{index.dim}-d vectors; rebuild the index with this encoder"
        )


def variant_note(encoder: Any, index: Any) -> str | None:
    """A warning when the index's vectors came from another variant than the one encoding the queries."""
    built = (getattr(index, "info", None) or {}).get("encoder_variant")
    used = getattr(encoder, "precision", None)
    if built and used and built != used:
        return (f"note: the index holds embeddings of the {built} variant but queries use the {used} variant "
                f"(close, not identical; --precision {built} matches them)")
    return None


def load_pair(encoder_path: str, index_path: str, precision: str = "auto") -> tuple[Any, Any]:
    encoder = load_encoder(encoder_path, precision)
    index = load_index(index_path)
    check_compatible(encoder, index, encoder_path, index_path)
    return encoder, index


def build_collections(args: argparse.Namespace) -> tuple[Any, Any]:
    """The served collection and the optional comparison one; ``AppError`` for anything the user must fix."""
    from app.collection import Collection
    from app.diagnostics import find_metrics

    if bool(args.compare_encoder) != bool(args.compare_index):
        raise AppError("give both --compare-encoder and --compare-index (or neither)")
    for name in ("index", "text_index", "compare_index"):  # s3://... indexes are served from a local copy
        if getattr(args, name, None):
            setattr(args, name, local_index(getattr(args, name)))
    if args.map_points < 10:
        raise AppError("--map-points must be at least 10")
    if args.map_limit < 1:
        raise AppError("--map-limit must be at least 1")
    if args.metrics and not os.path.isfile(args.metrics):
        raise AppError(f"metrics file {args.metrics} does not exist")
    precision = getattr(args, "precision", "auto")
    encoder, index = load_pair(args.encoder, args.index, precision)
    indexes = {"images": index}
    if args.text_index:
        text_index = load_index(args.text_index)
        check_compatible(encoder, text_index, args.encoder, args.text_index)
        indexes["captions"] = text_index
    main_collection = Collection(encoder=encoder, indexes=indexes, name="A", encoder_dir=args.encoder,
                                 metrics_path=find_metrics(args.encoder, args.metrics), map_points=args.map_points,
                                 map_limit=args.map_limit)
    compare = None
    if args.compare_encoder:
        other_encoder, other_index = load_pair(args.compare_encoder, args.compare_index, precision)
        compare = Collection(encoder=other_encoder, indexes={"images": other_index}, name="B",
                             encoder_dir=args.compare_encoder, thumbs=main_collection.thumbs,
                             metrics_path=find_metrics(args.compare_encoder), map_points=args.map_points,
                             map_limit=args.map_limit)
    return main_collection, compare


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, load the encoders and indexes, and serve until interrupted; returns the exit status."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    args = build_parser().parse_args(argv)
    try:
        auth = auth_from(args.auth)
        max_upload = parse_size(args.max_upload)
        collection, compare = build_collections(args)
    except (AppError, SafetyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    warning = exposure_warning(args.host, auth)
    if warning:
        print(warning, file=sys.stderr)

    from app.ui import build_app, launch_app

    demo = build_app(collection.encoder, title=args.title, collection=collection, compare=compare)
    shards = {str(record) for item in (collection, compare) if item is not None
              for record in item.index.info.get("shards") or []}
    blocked = blocked_paths(args.encoder, args.index, args.text_index, args.compare_encoder, args.compare_index,
                            shards=sorted(shards))
    try:
        url = launch_app(demo, host=args.host, port=args.port, block=False, auth=auth, max_upload=max_upload,
                         blocked=blocked)
    except OSError as error:  # e.g. the port is taken
        print(f"error: cannot serve on {args.host}:{args.port} (try another --port): {error}", file=sys.stderr)
        return EXIT_USAGE
    for item in (collection, compare):  # read the shards ahead, so the first searches are as fast as the rest
        if item is not None:
            threading.Thread(target=item.thumbs.warm, args=(list(item.index.info.get("shards") or []),),
                             name="manyview-warm", daemon=True).start()
    for item in (collection, compare):
        if item is not None:
            print(f"manyview: encoder {item.encoder_dir}: {item.encoder.describe()}", flush=True)
            note = variant_note(item.encoder, item.index)
            if note:
                print(note, file=sys.stderr)
    login = " (login required)" if auth else ""
    print(f"manyview: search API: gradio_client endpoints /search_text, /search_image, /search_id; JSON at "
          f"{url.rstrip('/')}/api/v1/search (docs: {url.rstrip('/')}/api/v1/docs){login}", flush=True)
    print(f"manyview: searching {collection.index.count} images at {url}{login} (Ctrl-C stops)", flush=True)
    demo.block_thread()  # returns after Ctrl-C, having closed the server
    return 0


if __name__ == "__main__":
    sys.exit(main())
