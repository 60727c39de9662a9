"""``python -m app --encoder RUN/onnx --index RUN/index [--host 127.0.0.1] [--port 7860]``.

Serves the search UI (``app.ui``) on ONNX + FAISS only. Binds 127.0.0.1 unless told otherwise and never
creates a public share link. Problems a user can fix (a missing directory, an encoder/index pair of
different dimensions) are reported as one ``error: ...`` line and exit status 2, not as a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

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
    return parser


def _require_dir(path: str, what: str, producer: str) -> None:
    if not os.path.exists(path):
        raise AppError(f"{what} directory {path} does not exist (make it with `{producer}`)")
    if not os.path.isdir(path):
        raise AppError(f"{what} path {path} is not a directory")


def load_encoder(path: str) -> Any:
    """``export.runtime.Encoder(path)``, with failures turned into ``AppError``."""
    _require_dir(path, "encoder", "python -m export --model RUN/model --output RUN/onnx")
    from export.runtime import Encoder

    try:
        return Encoder(path)
    except Exception as error:  # onnxruntime and JSON errors vary; report them in one line
        raise AppError(f"cannot load encoder {path}: {type(error).__name__}: {error}") from error


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


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, load the encoder and index, and serve until interrupted; returns the exit status."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    args = build_parser().parse_args(argv)
    try:
        encoder = load_encoder(args.encoder)
        index = load_index(args.index)
        check_compatible(encoder, index, args.encoder, args.index)
    except AppError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE

    from app.ui import build_app, launch_app

    demo = build_app(encoder, index, title=args.title)
    try:
        url = launch_app(demo, host=args.host, port=args.port, block=False)
    except OSError as error:  # e.g. the port is taken
        print(f"error: cannot serve on {args.host}:{args.port} (try another --port): {error}", file=sys.stderr)
        return EXIT_USAGE
    print(f"manyview: searching {index.count} images at {url} (Ctrl-C stops)", flush=True)
    demo.block_thread()  # returns after Ctrl-C, having closed the server
    return 0


if __name__ == "__main__":
    sys.exit(main())
