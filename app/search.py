"""Search logic of the app, free of Gradio: queries -> ``Hit`` lists, result filters, query history.

    hits = neighbours_for_text(encoder, index, "a photo of a ship", k=8)     # list[Hit]
    hits = neighbours_for_image(encoder, index, pil_image, k=8)
    hits = neighbours_for_id(encoder, index, sample_id, k=8)                # "more like this"
    hits = neighbours_for_text(encoder, index, "a ship", 8, ResultFilter(labels=("ship",)))

Runs on ONNX (``export.runtime.Encoder``) and FAISS (``index.search.Index``) only; never imports torch.
Bad input (empty query, no text tower, a missing or unreadable image) raises ``SearchError`` with a
message meant for the user.
"""
from __future__ import annotations

import io
import logging
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np

from app.thumbnails import ThumbnailStore, thumbnail

logger = logging.getLogger(__name__)

K_MIN, K_MAX, K_DEFAULT = 1, 50, 8  # the UI's slider
API_K_MAX = 1000  # the search API (app.api and the Gradio endpoints) answers up to this many results
MAX_CANDIDATES = 2048  # filtered searches look at least this deep before giving up (FAISS's GPU limit on k) ...
CANDIDATES_PER_RESULT = 64  # ... and up to this many candidates per wanted result (k = 1000 -> 64,000)
MAX_QUERY_PIXELS = 40_000_000  # larger uploads are refused before decoding (decompression bombs)
HISTORY_LIMIT = 20
UPLOAD_HINT = "Upload a JPEG, PNG or WebP picture."


class EncoderLike(Protocol):
    """What the app needs of ``export.runtime.Encoder``."""

    has_text: bool
    dim: int
    info: dict

    def encode_images(self, images: Sequence[Any]) -> np.ndarray: ...

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...


def encoder_execution(encoder: Any) -> str:
    """E.g. ``"int8 variant on CPUExecutionProvider"`` (``Encoder.describe()``); "" for encoders without it."""
    describe = getattr(encoder, "describe", None)
    return str(describe()) if callable(describe) else ""


class SearchError(ValueError):
    """A search that cannot run because of the user's input; the message is shown in the UI."""


class UnknownSample(SearchError):
    """A sample id that is not in the index (the JSON API answers 404)."""


@dataclass
class UnreadableUpload:
    """Stands in for an upload that Gradio could not decode, so the handler can explain it."""

    message: str


@dataclass
class Hit:
    """One neighbour: its sample id, similarity score, metadata record and image."""

    id: int
    score: float
    record: dict = field(default_factory=dict)
    image: Any = None

    @property
    def label(self) -> str:
        """The class name, else the caption, else ``#id``."""
        name = self.record.get("label_name") or self.record.get("caption")
        return str(name) if name else f"#{self.id}"

    @property
    def caption(self) -> str:
        """Gallery caption, e.g. ``ship · score 0.873``."""
        return f"{self.label} · score {self.score:.3f}"


@dataclass(frozen=True)
class ResultFilter:
    """Keep results whose label is one of ``labels`` (any, when empty) and whose caption contains every
    word of ``words`` (case-insensitive, whole words)."""

    labels: tuple[str, ...] = ()
    words: tuple[str, ...] = ()

    @classmethod
    def parse(cls, labels: Sequence[str] | str | None, words: str | None) -> "ResultFilter":
        if isinstance(labels, str):
            labels = [labels]
        return cls(tuple(str(label) for label in (labels or []) if str(label)),
                   tuple(re.findall(r"\w+", (words or "").lower())))

    @property
    def active(self) -> bool:
        return bool(self.labels or self.words)

    def matches(self, record: dict) -> bool:
        if self.labels and str(record.get("label_name") or "") not in self.labels:
            return False
        if self.words:
            caption = set(re.findall(r"\w+", str(record.get("caption") or "").lower()))
            return all(word in caption for word in self.words)
        return True

    def describe(self) -> str:
        parts = []
        if self.labels:
            parts.append("label " + " or ".join(self.labels))
        if self.words:
            parts.append("caption with " + " ".join(f"'{word}'" for word in self.words))
        return ", ".join(parts)


# ----------------------------------------------------------------------------------------------------
# queries
# ----------------------------------------------------------------------------------------------------


def clamp_k(k: Any, count: int, k_max: int = K_MAX) -> int:
    """``k`` as an int in ``[1, min(k_max, count)]`` (at least 1 even for an empty collection)."""
    try:
        value = int(round(float(k)))
    except (TypeError, ValueError):
        value = K_DEFAULT
    return max(K_MIN, min(value, int(k_max), max(int(count), 1)))


def candidate_limit(k: int, count: int) -> int:
    """How deep a filtered search may look for ``k`` results: ``MAX_CANDIDATES`` or ``CANDIDATES_PER_RESULT``
    per result, whichever is more, so that k = 1000 results of a label holding a tenth of the collection
    are still found; never more than the collection."""
    return max(1, min(int(count), max(MAX_CANDIDATES, CANDIDATES_PER_RESULT * int(k))))


def _filter_mask(index: Any, ids: list[int], result_filter: ResultFilter) -> list[bool]:
    """Which of ``ids`` pass ``result_filter``, reading only the filtered metadata columns.

    A deep filtered search looks at tens of thousands of candidates: turning each into a full record
    (``Index.records``) costs far more than the search, so the label test runs in pyarrow over one column
    and captions are read only when there are caption words to match."""
    metadata, rows_of = getattr(index, "metadata", None), getattr(index, "rows", None)
    if metadata is None or rows_of is None:  # an index-like object without a metadata table
        return [result_filter.matches(record) for record in index.records(ids)]
    import pyarrow as pa
    import pyarrow.compute as pc

    rows = pa.array(rows_of(ids))
    keep = np.ones(len(ids), dtype=bool)
    if result_filter.labels:
        names = pc.fill_null(pc.cast(metadata.column("label_name").take(rows), pa.string()), "")
        wanted = pa.array(list(result_filter.labels), pa.string())
        keep &= pc.is_in(names, value_set=wanted).to_numpy(zero_copy_only=False)
    if result_filter.words and keep.any():
        captions = metadata.column("caption").take(rows).to_pylist()
        keep &= np.array([bool(kept) and result_filter.matches({"caption": caption})
                          for kept, caption in zip(keep, captions)], dtype=bool)
    return keep.tolist()


def _images_for(index: Any, records: list[dict], thumbs: ThumbnailStore | None) -> list[Any]:
    if thumbs is not None:
        return thumbs.images(records)
    return [index.image(int(record["id"])) for record in records]


@contextmanager
def one_search_thread() -> Iterator[None]:
    """Run the FAISS calls inside with one OpenMP thread, in this thread only.

    A single query gains nothing from OpenMP, and on a busy machine waking the second OpenMP thread is what
    costs: on the 2 shared cores, HNSW search of one query took 0.2 ms at the median but 15-36 ms at the
    90th percentile with faiss's 2 threads, and 0.2-0.4 ms at the 90th with 1 (tests/benchmarks/RESULTS_app.md).
    ``omp_set_num_threads`` sets the calling thread's value only, so bulk work in other threads (the map's
    projection, k-means) keeps every core; the previous value is restored on the way out."""
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss is a dependency of the app
        yield
        return
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def search_vector(index: Any, vector: np.ndarray, k: int, result_filter: ResultFilter | None = None,
                  thumbs: ThumbnailStore | None = None, with_images: bool = True, k_max: int = K_MAX) -> list[Hit]:
    """The ``k`` best hits for one embedding (FAISS's ``-1`` padding dropped), with records and images.

    ``k`` is clamped to ``[1, k_max]`` and to the collection. With an active filter the search looks deeper
    (4k, doubling, up to ``candidate_limit(k)``) until ``k`` results pass it, so a rare label still fills
    the page when it is among the nearest candidates. ``with_images=False`` reads no shard (the API
    hands out thumbnail URLs instead).
    """
    if index.count <= 0:
        return []
    query = np.ascontiguousarray(np.asarray(vector, dtype=np.float32).reshape(1, -1))
    if query.shape[1] != index.dim:
        raise SearchError(f"the query embedding is {query.shape[1]}-d but the index holds {index.dim}-d vectors")
    k = clamp_k(k, index.count, k_max)
    filtering = result_filter is not None and result_filter.active
    limit = candidate_limit(k, index.count)
    depth = k if not filtering else min(limit, max(4 * k, 64))
    while True:
        with one_search_thread():
            scores, ids = index.search(query, depth)
        pairs = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if int(i) >= 0]
        if filtering and pairs:
            mask = _filter_mask(index, [i for i, _ in pairs], result_filter)  # type: ignore[arg-type]
            pairs = [pair for pair, keep in zip(pairs, mask) if keep]
        if len(pairs) >= k or depth >= limit:
            break
        depth = min(limit, depth * 2)
    pairs = pairs[:k]
    records = index.records([i for i, _ in pairs]) if pairs else []
    images = _images_for(index, records, thumbs) if with_images and records else [None] * len(records)
    return [Hit(id=i, score=s, record=dict(record), image=image)
            for (i, s), record, image in zip(pairs, records, images)]


def load_query_image(image: Any) -> Any:
    """Accept a PIL image, a numpy array, a path or bytes; return an RGB PIL image or raise ``SearchError``."""
    from PIL import Image, UnidentifiedImageError

    if image is None:
        raise SearchError("Upload an image first.")
    if isinstance(image, UnreadableUpload):
        raise SearchError(image.message)
    Image.MAX_IMAGE_PIXELS = MAX_QUERY_PIXELS
    try:
        if isinstance(image, Image.Image):
            image.load()
            return image.convert("RGB")
        if isinstance(image, np.ndarray):
            return Image.fromarray(image).convert("RGB")
        if isinstance(image, (bytes, bytearray)):
            with Image.open(io.BytesIO(image)) as opened:
                opened.load()
                return opened.convert("RGB")
        if isinstance(image, (str, os.PathLike)):
            with Image.open(image) as opened:
                opened.load()
                return opened.convert("RGB")
    except Image.DecompressionBombError as error:
        raise SearchError(f"That picture is too large ({error}). Scale it down first.") from error
    except (UnidentifiedImageError, OSError, ValueError, TypeError, SyntaxError) as error:
        raise SearchError(f"That upload is not a readable image ({type(error).__name__}). {UPLOAD_HINT}") from error
    raise SearchError(f"That upload is not an image (got {type(image).__name__}). {UPLOAD_HINT}")


def text_vector(encoder: EncoderLike, query: str) -> np.ndarray:
    if not getattr(encoder, "has_text", False):
        raise SearchError("This encoder has no text tower; search by image instead.")
    text = (query or "").strip()
    if not text:
        raise SearchError("Type a text query first.")
    return encoder.encode_texts([text])[0]


def neighbours_for_text(encoder: EncoderLike, index: Any, query: str, k: int,
                        result_filter: ResultFilter | None = None, thumbs: ThumbnailStore | None = None,
                        with_images: bool = True, k_max: int = K_MAX) -> list[Hit]:
    """The ``k`` indexed samples closest to a text query."""
    return search_vector(index, text_vector(encoder, query), k, result_filter, thumbs, with_images, k_max)


def neighbours_for_image(encoder: EncoderLike, index: Any, image: Any, k: int,
                         result_filter: ResultFilter | None = None, thumbs: ThumbnailStore | None = None,
                         with_images: bool = True, k_max: int = K_MAX) -> list[Hit]:
    """The ``k`` indexed samples closest to an image (PIL, array, path or bytes)."""
    vectors = encoder.encode_images([load_query_image(image)])
    return search_vector(index, vectors[0], k, result_filter, thumbs, with_images, k_max)


def load_captioner(encoder: Any) -> Any:
    """The caption generator (``export.captions.Captioner``) of the encoder's export when it has caption graphs
    (a CoCa model), else None."""
    from export.captions import has_captioner

    directory = getattr(encoder, "directory", None)
    if directory is None or not has_captioner(getattr(encoder, "info", None) or {}):
        return None
    from export.captions import Captioner

    return Captioner(directory)


def caption_status(captioner: Any, image: Any) -> str:
    """The status line's addition for a query image: its generated caption as Markdown ("" without a captioner,
    for an unreadable image, or when generation fails, which is logged: the search answer stands)."""
    if captioner is None or image is None:
        return ""
    try:
        text = captioner.caption([load_query_image(image)])[0]
    except SearchError:
        return ""
    except Exception:  # noqa: BLE001 - a caption is an extra; never lose the search answer over it
        logger.exception("caption generation failed")
        return ""
    return f"  \nGenerated caption: *{md_escape(text) if text else '(empty)'}*"


def sample_record(index: Any, sample_id: Any) -> dict:
    """The metadata record of an indexed sample; ``UnknownSample`` for an id that is not in the index."""
    try:
        number = int(sample_id)
    except (TypeError, ValueError) as error:
        raise SearchError(f"A sample id is a whole number, not {sample_id!r}.") from error
    try:
        records = index.records([number]) if number >= 0 else []
    except KeyError:
        records = []
    if not records:
        ids = np.asarray(index.ids)
        span = f" (its ids lie between {int(ids.min())} and {int(ids.max())})" if ids.size else " (it is empty)"
        raise UnknownSample(f"Sample #{number} is not in the index{span}.")
    return records[0]


def sample_image(index: Any, sample_id: int, thumbs: ThumbnailStore | None = None) -> tuple[dict, Any]:
    """The metadata record and image of an indexed sample; ``UnknownSample`` for an id that is not in the
    index, ``SearchError`` when its image cannot be read."""
    record = sample_record(index, sample_id)
    try:
        picture = thumbs.image(record) if thumbs is not None else index.image(int(sample_id))
    except (KeyError, IndexError, ValueError, OSError) as error:
        raise SearchError(f"Sample #{sample_id} cannot be read from its shard ({error}).") from error
    return record, picture


def neighbours_for_id(encoder: EncoderLike, index: Any, sample_id: int, k: int,
                      result_filter: ResultFilter | None = None, thumbs: ThumbnailStore | None = None,
                      with_images: bool = True, k_max: int = K_MAX, source: Any = None) -> list[Hit]:
    """"More like this": the ``k`` samples closest to an indexed sample, re-encoded from its shard image.
    ``source``: the index holding the sample when it differs from the searched one (the caption index)."""
    _, picture = sample_image(index if source is None else source, sample_id, thumbs)
    return neighbours_for_image(encoder, index, picture, k, result_filter, thumbs, with_images, k_max)


def search_text(encoder: EncoderLike, index: Any, query: str, k: int) -> list[tuple[Any, str]]:
    """Text search as gallery items: ``[(PIL.Image, "label · score 0.873"), ...]``."""
    return [(hit.image, hit.caption) for hit in neighbours_for_text(encoder, index, query, k)]


def search_image(encoder: EncoderLike, index: Any, image: Any, k: int) -> list[tuple[Any, str]]:
    """Image search as gallery items: ``[(PIL.Image, "label · score 0.873"), ...]``."""
    return [(hit.image, hit.caption) for hit in neighbours_for_image(encoder, index, image, k)]


def status_line(count: int, what: str, elapsed_s: float, wanted: int | None = None,
                result_filter: ResultFilter | None = None) -> str:
    """E.g. ``8 results for 'a photo of a ship' in 12 ms`` (plus the filter and any shortfall)."""
    noun = "result" if count == 1 else "results"
    line = f"{count} {noun} for {what} in {elapsed_s * 1000:.0f} ms"
    if result_filter is not None and result_filter.active:
        line += f" (filter: {result_filter.describe()}"
        if wanted is not None and count < wanted:
            line += f"; no more among the nearest {candidate_limit(wanted, 1 << 62):,}"
        line += ")"
    return line


# ----------------------------------------------------------------------------------------------------
# handlers' plumbing (no Gradio types)
# ----------------------------------------------------------------------------------------------------

_MARKDOWN_SPECIALS = str.maketrans({c: "\\" + c for c in "\\`*_{}[]<>#|~$"})


def md_escape(text: str) -> str:
    """Escape the characters that Markdown (or Gradio's LaTeX) would interpret in user-supplied text."""
    return text.translate(_MARKDOWN_SPECIALS)


def short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def run_search(search: Callable[[], list[Hit]], what: str, wanted: int | None = None,
               result_filter: ResultFilter | None = None) -> tuple[list[tuple[Any, str]], list[int], str]:
    """Run one search; return gallery items, result ids and a Markdown status line.

    User errors (``SearchError``) and unexpected failures both end up in the status line, so one bad
    request never leaves the page without an answer; the latter are also logged with their traceback.
    """
    start = time.perf_counter()
    try:
        hits = search()
    except SearchError as error:
        return [], [], f"⚠️ {md_escape(str(error))}"
    except Exception as error:  # noqa: BLE001 - keep serving; the log has the details
        logger.exception("search for %s failed", what)
        return [], [], f"⚠️ Search failed ({type(error).__name__}): {md_escape(str(error))}"
    elapsed = time.perf_counter() - start
    gallery = [(thumbnail(hit.image), hit.caption) for hit in hits]
    return gallery, [hit.id for hit in hits], md_escape(status_line(len(hits), what, elapsed, wanted, result_filter))


# ----------------------------------------------------------------------------------------------------
# query history
# ----------------------------------------------------------------------------------------------------


def history_label(entry: dict) -> str:
    """How a history entry reads in the list, e.g. ``text: a photo of a ship`` or ``sample #17 (ship)``."""
    kind = entry.get("kind")
    if kind == "text":
        return f"text: {short(str(entry.get('query', '')), 50)}"
    if kind == "id":
        name = entry.get("name")
        return f"sample #{entry.get('id')}" + (f" ({name})" if name else "")
    return f"image: {entry.get('name') or 'upload'} at {entry.get('time', '')}".strip()


def push_history(history: list[dict] | None, entry: dict, limit: int = HISTORY_LIMIT) -> list[dict]:
    """``entry`` first, then the older entries with a different label, at most ``limit`` of them."""
    label = history_label(entry)
    older = [item for item in (history or []) if history_label(item) != label]
    return [entry, *older][:limit]


def find_history(history: list[dict] | None, label: str | None) -> dict | None:
    for entry in history or []:
        if history_label(entry) == label:
            return entry
    return None
