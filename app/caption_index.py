"""A caption index: the text embeddings of an image index's captions, same ids, same metadata.

    python -m app.caption_index --encoder RUN/onnx --index RUN/index --output RUN/caption-index
    python -m app --encoder RUN/onnx --index RUN/index --text-index RUN/caption-index

With both, the Search tab's "Search in" choice switches between the images and their captions (text ->
caption search finds samples by what their captions say; image -> caption search is zero-shot
captioning by retrieval). Results show the samples' images either way, since the ids are shared.
Needs an image-text encoder. No torch.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

import numpy as np


class CaptionSource:
    """``index.sources``-style source over caption embeddings (vectors + the image index's metadata rows)."""

    def __init__(self, vectors: np.ndarray, table: Any, image_index: str, block: int = 65536) -> None:
        self.vectors, self.table, self.block, self.image_index = vectors, table, block, image_index
        self.count, self.dim = vectors.shape

    def blocks(self):
        for start in range(0, self.count, self.block):
            stop = min(self.count, start + self.block)
            yield self.vectors[start:stop], self.table.slice(start, stop - start)

    def describe(self) -> dict:
        return {"data": f"captions of {self.image_index}", "modality": "text", "has_text": True, "skipped": 0,
                "skipped_keys": []}


def build_caption_index(encoder_dir: str, index_dir: str, output_dir: str, batch_size: int = 256) -> dict:
    """Embed every caption of ``index_dir``'s metadata with ``encoder_dir``'s text tower and index them."""
    from export.runtime import Encoder
    from index.build import build_from_source
    from index.search import Index

    encoder = Encoder(encoder_dir)
    if not encoder.has_text:
        raise ValueError(f"the encoder {encoder_dir} has no text tower; a caption index needs an image-text model")
    image_index = Index.load(index_dir)
    table = image_index.metadata
    captions = [str(caption or "") for caption in table.column("caption").to_pylist()]
    if not any(captions):
        raise ValueError(f"the metadata of {index_dir} holds no captions")
    vectors = np.concatenate([encoder.encode_texts(captions[start:start + batch_size])
                              for start in range(0, len(captions), batch_size)])
    return build_from_source(CaptionSource(vectors, table, str(image_index.directory)), output_dir)[0]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.caption_index", description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", required=True, help="image-text ONNX encoder directory")
    parser.add_argument("--index", required=True, help="image index whose captions to embed")
    parser.add_argument("--output", required=True, help="caption index directory to write")
    args = parser.parse_args(argv)
    try:
        info = build_caption_index(args.encoder, args.index, args.output)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"indexed {info['count']} captions ({info['factory']}) in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
