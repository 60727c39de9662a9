"""The search web UI: plain search functions plus a Gradio Blocks app built on them.

Everything here runs on ONNX (``export.runtime.Encoder``) and FAISS (``index.search.Index``) only;
it must never import torch. Gradio is imported lazily (inside ``build_app`` / ``launch_app``) so that
importing this module has no side effects and the plain search functions can be unit-tested without it.

Pure search API (no Gradio)::

    hits = neighbours_for_text(encoder, index, "a photo of a ship", k=8)     # list[Hit]
    hits = neighbours_for_image(encoder, index, pil_image, k=8)
    hits = neighbours_for_id(encoder, index, sample_id, k=8)                # "more like this"
    pairs = search_text(encoder, index, "a photo of a ship", k=8)           # list[(PIL.Image, caption)]
    pairs = search_image(encoder, index, pil_image, k=8)

Bad input (empty query, no text tower, a missing or unreadable image) raises ``SearchError`` with a
message meant for the user.
"""
from __future__ import annotations

import html
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - typing only
    import gradio as gr
    from PIL import Image as PILImage

logger = logging.getLogger(__name__)

K_MIN, K_MAX, K_DEFAULT = 1, 50, 8
_UPLOAD_HINT = "Upload a JPEG, PNG or WebP picture."
THUMB_MIN_SIDE = 128
MAX_UPLOAD = "25mb"  # bigger uploads are refused by Gradio before they reach the encoder

CSS = """
#mv-gallery img { image-rendering: pixelated; }
#mv-gallery .caption-label { font-size: 0.8em; max-width: 95%; }
"""


class EncoderLike(Protocol):
    """What the UI needs of ``export.runtime.Encoder``."""

    has_text: bool
    dim: int
    info: dict

    def encode_images(self, images: Sequence[Any]) -> np.ndarray: ...

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...


class IndexLike(Protocol):
    """What the UI needs of ``index.search.Index``."""

    count: int
    dim: int
    info: dict

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def records(self, ids: Sequence[int]) -> list[dict]: ...

    def image(self, sample_id: int) -> Any: ...


class SearchError(ValueError):
    """A search that cannot run because of the user's input; the message is shown in the UI."""


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


# ----------------------------------------------------------------------------------------------------
# Pure search logic
# ----------------------------------------------------------------------------------------------------


def clamp_k(k: Any, count: int) -> int:
    """``k`` as an int in ``[1, min(K_MAX, count)]`` (at least 1 even for an empty collection)."""
    try:
        value = int(round(float(k)))
    except (TypeError, ValueError):
        value = K_DEFAULT
    return max(K_MIN, min(value, K_MAX, max(int(count), 1)))


def _search_vector(index: IndexLike, vector: np.ndarray, k: int) -> list[Hit]:
    """Search one embedding, dropping FAISS's ``-1`` padding, and attach records and images."""
    if index.count <= 0:
        return []
    query = np.ascontiguousarray(np.asarray(vector, dtype=np.float32).reshape(1, -1))
    if query.shape[1] != index.dim:
        raise SearchError(f"the query embedding is {query.shape[1]}-d but the index holds {index.dim}-d vectors")
    scores, ids = index.search(query, clamp_k(k, index.count))
    pairs = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if int(i) >= 0]
    if not pairs:
        return []
    records = index.records([i for i, _ in pairs])
    return [Hit(id=i, score=s, record=dict(r), image=index.image(i)) for (i, s), r in zip(pairs, records)]


def load_query_image(image: Any) -> "PILImage.Image":
    """Accept a PIL image, a numpy array, a path or bytes; return an RGB PIL image or raise ``SearchError``."""
    from PIL import Image, UnidentifiedImageError

    if image is None:
        raise SearchError("Upload an image first.")
    if isinstance(image, UnreadableUpload):
        raise SearchError(image.message)
    try:
        if isinstance(image, Image.Image):
            image.load()
            return image.convert("RGB")
        if isinstance(image, np.ndarray):
            return Image.fromarray(image).convert("RGB")
        if isinstance(image, (bytes, bytearray)):
            import io

            with Image.open(io.BytesIO(image)) as opened:
                opened.load()
                return opened.convert("RGB")
        if isinstance(image, (str, os.PathLike)):
            with Image.open(image) as opened:
                opened.load()
                return opened.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, TypeError, SyntaxError) as error:
        raise SearchError(f"That upload is not a readable image ({type(error).__name__}). {_UPLOAD_HINT}") from error
    raise SearchError(f"That upload is not an image (got {type(image).__name__}). {_UPLOAD_HINT}")


def neighbours_for_text(encoder: EncoderLike, index: IndexLike, query: str, k: int) -> list[Hit]:
    """The ``k`` indexed samples closest to a text query."""
    if not getattr(encoder, "has_text", False):
        raise SearchError("This encoder has no text tower; search by image instead.")
    text = (query or "").strip()
    if not text:
        raise SearchError("Type a text query first.")
    vectors = encoder.encode_texts([text])
    return _search_vector(index, vectors[0], k)


def neighbours_for_image(encoder: EncoderLike, index: IndexLike, image: Any, k: int) -> list[Hit]:
    """The ``k`` indexed samples closest to an image (PIL, array, path or bytes)."""
    picture = load_query_image(image)
    vectors = encoder.encode_images([picture])
    return _search_vector(index, vectors[0], k)


def neighbours_for_id(encoder: EncoderLike, index: IndexLike, sample_id: int, k: int) -> list[Hit]:
    """"More like this": the ``k`` samples closest to an indexed sample, re-encoded from its shard image."""
    try:
        picture = index.image(int(sample_id))
    except (KeyError, IndexError, ValueError, OSError) as error:
        raise SearchError(f"Sample #{sample_id} cannot be read from its shard ({error}).") from error
    return neighbours_for_image(encoder, index, picture, k)


def search_text(encoder: EncoderLike, index: IndexLike, query: str, k: int) -> list[tuple[Any, str]]:
    """Text search as gallery items: ``[(PIL.Image, "label · score 0.873"), ...]``."""
    return [(hit.image, hit.caption) for hit in neighbours_for_text(encoder, index, query, k)]


def search_image(encoder: EncoderLike, index: IndexLike, image: Any, k: int) -> list[tuple[Any, str]]:
    """Image search as gallery items: ``[(PIL.Image, "label · score 0.873"), ...]``."""
    return [(hit.image, hit.caption) for hit in neighbours_for_image(encoder, index, image, k)]


def status_line(count: int, what: str, elapsed_s: float) -> str:
    """E.g. ``8 results for 'a photo of a ship' in 12 ms``."""
    noun = "result" if count == 1 else "results"
    return f"{count} {noun} for {what} in {elapsed_s * 1000:.0f} ms"


# ----------------------------------------------------------------------------------------------------
# Model card
# ----------------------------------------------------------------------------------------------------


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format_value(v) for v in value) if len(value) <= 4 else f"{len(value)} items"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_format_value(v)}" for k, v in value.items())
    return str(value)


def _table(title: str, data: dict) -> str:
    """A two-column markdown table of the non-empty entries of ``data``."""
    rows = "".join(
        f"| {html.escape(str(key))} | {html.escape(_format_value(value)).replace('|', '&#124;')} |\n"
        for key, value in data.items()
        if value not in (None, "", [], {})
    )
    return f"**{title}**\n\n| field | value |\n|---|---|\n{rows}" if rows else f"**{title}**: (none)\n"


def model_card_markdown(encoder: EncoderLike, index: IndexLike) -> str:
    """Markdown tables describing the model (``preprocess.json``'s ``model``) and the index (``index.json``)."""
    einfo = dict(getattr(encoder, "info", {}) or {})
    model = dict(einfo.get("model") or {})
    model.setdefault("embedding dim", getattr(encoder, "dim", "?"))
    model.setdefault("text search", "yes" if getattr(encoder, "has_text", False) else "no")
    for key in ("image_size", "channels"):
        if key in einfo:
            model.setdefault(key, einfo[key])
    iinfo = dict(getattr(index, "info", {}) or {})
    iinfo.setdefault("count", getattr(index, "count", "?"))
    iinfo.setdefault("dim", getattr(index, "dim", "?"))
    return _table("Model", model) + "\n\n" + _table("Index", iinfo)


# ----------------------------------------------------------------------------------------------------
# Gradio app
# ----------------------------------------------------------------------------------------------------


@dataclass
class UnreadableUpload:
    """Stands in for an upload that Gradio could not decode, so the handler can explain it."""

    message: str


def _gradio():
    """Import gradio with analytics off (must be set before the first import)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import gradio

    return gradio


def _safe_image_class():
    """A ``gr.Image`` whose preprocessing turns broken uploads into ``UnreadableUpload`` instead of raising."""
    gr = _gradio()

    class SafeImage(gr.Image):
        # Marks a template of gr.Image, so the frontend renders it with the stock "image" component.
        is_template = True

        def preprocess(self, payload):  # type: ignore[override]
            try:
                return super().preprocess(payload)
            except Exception as error:  # any decode failure: report it instead of a generic "Error"
                name = getattr(payload, "orig_name", None) or "the upload"
                return UnreadableUpload(f"Could not read {name} as an image ({type(error).__name__}). {_UPLOAD_HINT}")

    return SafeImage


def _thumbnail(image: Any) -> Any:
    """Scale tiny images (e.g. 32x32 CIFAR) up with nearest-neighbour so the gallery shows them crisply."""
    try:
        from PIL import Image

        side = min(image.size)
        if 0 < side < THUMB_MIN_SIDE:
            factor = max(1, THUMB_MIN_SIDE // side)
            return image.resize((image.size[0] * factor, image.size[1] * factor), Image.NEAREST)
    except Exception:  # a thumbnail is cosmetic; never fail a search over it
        pass
    return image


_MARKDOWN_SPECIALS = str.maketrans({c: "\\" + c for c in "\\`*_{}[]<>#|~$"})


def _md_escape(text: str) -> str:
    """Escape the characters that Markdown (or Gradio's LaTeX) would interpret in user-supplied text."""
    return text.translate(_MARKDOWN_SPECIALS)


def _run(search: Callable[[], list[Hit]], what: str) -> tuple[list[tuple[Any, str]], list[int], str]:
    """Run one search; return gallery items, result ids and a Markdown status line.

    User errors (``SearchError``) and unexpected failures both end up in the status line, so one bad
    request never leaves the page without an answer; the latter are also logged with their traceback.
    """
    start = time.perf_counter()
    try:
        hits = search()
    except SearchError as error:
        return [], [], f"⚠️ {_md_escape(str(error))}"
    except Exception as error:  # keep serving; the log has the details
        logger.exception("search for %s failed", what)
        return [], [], f"⚠️ Search failed ({type(error).__name__}): {_md_escape(str(error))}"
    elapsed = time.perf_counter() - start
    gallery = [(_thumbnail(hit.image), hit.caption) for hit in hits]
    return gallery, [hit.id for hit in hits], _md_escape(status_line(len(hits), what, elapsed))


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def build_app(encoder: EncoderLike, index: IndexLike, title: str = "manyview search") -> "gr.Blocks":
    """The search UI as a ``gr.Blocks``: text query (when the encoder has a text tower), image upload,
    k slider, a gallery whose items search "more like this" when clicked, a status line and a model card."""
    gr = _gradio()
    SafeImage = _safe_image_class()

    def on_text(query: str, k: float):
        return _run(lambda: neighbours_for_text(encoder, index, query, int(k)), f"'{_short((query or '').strip())}'")

    def on_image(image: Any, k: float):
        return _run(lambda: neighbours_for_image(encoder, index, image, int(k)), "the uploaded image")

    def on_select(ids: list[int], k: float, evt: gr.SelectData):
        position = evt.index if isinstance(evt.index, int) else (evt.index or [0])[0]
        if not ids or not 0 <= position < len(ids):
            return gr.skip(), gr.skip(), "⚠️ That result is no longer available; search again.", gr.skip()
        sample_id = ids[position]
        try:
            record = (index.records([sample_id]) or [{}])[0]
            picture = index.image(sample_id)
        except (KeyError, ValueError, OSError) as error:
            return gr.skip(), gr.skip(), f"⚠️ Sample #{sample_id} cannot be read from its shard ({error}).", gr.skip()
        what = f"the clicked {Hit(id=sample_id, score=0.0, record=record).label} image ({record.get('key', sample_id)})"
        gallery, new_ids, status = _run(lambda: neighbours_for_image(encoder, index, picture, int(k)), what)
        # The clicked image becomes the query image, so "Search image" repeats this search.
        return gr.Gallery(value=gallery, selected_index=None), new_ids, status, _thumbnail(picture)

    # Gradio finds the event-data parameter by its annotation; resolve it here, since this module's
    # annotations are strings and ``gr`` is not a module-level name.
    on_select.__annotations__["evt"] = gr.SelectData

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"## {html.escape(title)}\n{index.count:,} images indexed · {index.dim}-d embeddings")
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                with gr.Group(visible=bool(encoder.has_text)):
                    query = gr.Textbox(label="Text query", placeholder="a photo of a ship", elem_id="mv-query",
                                       interactive=bool(encoder.has_text))
                    text_button = gr.Button("Search text", variant="primary", elem_id="mv-text-search",
                                            interactive=bool(encoder.has_text))
                if not encoder.has_text:
                    gr.Markdown("*This encoder has no text tower: search by image.*", elem_id="mv-no-text")
                upload = SafeImage(label="Query image", type="pil", sources=["upload", "clipboard"],
                                   height=220, elem_id="mv-upload")
                image_button = gr.Button("Search image", elem_id="mv-image-search")
                k_slider = gr.Slider(K_MIN, K_MAX, value=K_DEFAULT, step=1, label="k (results)", elem_id="mv-k")
                with gr.Accordion("Model card", open=False, elem_id="mv-card"):
                    gr.Markdown(model_card_markdown(encoder, index))
            with gr.Column(scale=3):
                hint = "Type a query or upload an image." if encoder.has_text else "Upload an image."
                status = gr.Markdown(f"{hint} Click a result for more like it.", elem_id="mv-status")
                gallery = gr.Gallery(label="Neighbours", columns=6, height="auto", object_fit="contain",
                                     allow_preview=False, format="png", elem_id="mv-gallery")
        ids_state = gr.State([])

        outputs = [gallery, ids_state, status]
        if encoder.has_text:
            text_button.click(on_text, [query, k_slider], outputs)
            query.submit(on_text, [query, k_slider], outputs)
        image_button.click(on_image, [upload, k_slider], outputs)
        upload.upload(on_image, [upload, k_slider], outputs)
        gallery.select(on_select, [ids_state, k_slider], [*outputs, upload])
    return demo


def launch_app(demo: "gr.Blocks", host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> str:
    """Serve ``demo`` on ``host:port`` (never a public share link) and return its local URL.

    With ``block`` the call then waits until the server is interrupted (Ctrl-C) and closes it.
    Raises ``OSError`` when the port cannot be bound.
    """
    demo.queue(default_concurrency_limit=2)
    _, url, _ = demo.launch(server_name=host, server_port=port, share=False, inbrowser=False, css=CSS,
                            prevent_thread_lock=True, show_error=False, footer_links=["settings"], quiet=True,
                            max_file_size=MAX_UPLOAD)
    if block:
        demo.block_thread()
    return str(url)
