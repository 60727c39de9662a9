"""The web app: a Gradio Blocks UI with Search, Map, Diagnostics, Curate and Compare tabs.

Everything runs on ONNX (``export.runtime.Encoder``) and FAISS (``index.search.Index``) only; it must
never import torch. Gradio is imported lazily (inside ``build_app`` / ``launch_app``), so importing this
module has no side effects and the search functions it re-exports (from ``app.search``) can be used
without it::

    hits = neighbours_for_text(encoder, index, "a photo of a ship", k=8)     # list[Hit]
    pairs = search_image(encoder, index, pil_image, k=8)                    # list[(PIL.Image, caption)]

Modules: ``app.search`` (queries, filters, history), ``app.thumbnails`` (images from the shards),
``app.collection`` (what is served + the cached sample), ``app.search_tab``, ``app.map_tab``,
``app.diagnostics`` / ``app.diagnostics_tab``, ``app.compare_tab``, ``app.safety``.
"""
from __future__ import annotations

import html
import os
from typing import TYPE_CHECKING, Any, Sequence

from app.collection import Collection
from app.safety import DEFAULT_MAX_UPLOAD
from app.search import (  # noqa: F401 - re-exported: the search API of the app
    K_DEFAULT, K_MAX, K_MIN, UPLOAD_HINT, Hit, ResultFilter, SearchError, UnreadableUpload, clamp_k, encoder_execution,
    load_query_image, md_escape, neighbours_for_id, neighbours_for_image, neighbours_for_text, run_search, search_image,
    search_text, status_line,
)
from app.thumbnails import THUMB_MIN_SIDE, ThumbnailStore, thumbnail  # noqa: F401

if TYPE_CHECKING:  # pragma: no cover - typing only
    import gradio as gr

PUBLIC_ENDPOINTS = ("search_text", "search_image", "search_id")  # everything else is the page's own business

CSS = """
#mv-gallery img, #mv-map-gallery img, #mv-curate-gallery img, #mv-cmp-gallery-a img, #mv-cmp-gallery-b img,
#mv-upload img, #mv-cmp-upload img {
  image-rendering: pixelated; }
.caption-label { font-size: 0.8em; max-width: 95%; }
"""


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


def model_card_markdown(encoder: Any, index: Any) -> str:
    """Markdown tables describing the model (``preprocess.json``'s ``model``, the variant and provider the
    encoder runs) and the index (``index.json``)."""
    einfo = dict(getattr(encoder, "info", {}) or {})
    model = dict(einfo.get("model") or {})
    model.setdefault("embedding dim", getattr(encoder, "dim", "?"))
    model.setdefault("text search", "yes" if getattr(encoder, "has_text", False) else "no")
    execution = dict(getattr(encoder, "execution", None) or {})
    if execution:
        model.setdefault("encoder variant", execution.get("variant"))
        model.setdefault("execution provider", execution.get("provider"))
        model.setdefault("image encoder file", execution.get("image_model"))
    for key in ("image_size", "channels"):
        if key in einfo:
            model.setdefault(key, einfo[key])
    iinfo = {key: value for key, value in dict(getattr(index, "info", {}) or {}).items() if key != "recall"}
    iinfo.setdefault("count", getattr(index, "count", "?"))
    iinfo.setdefault("dim", getattr(index, "dim", "?"))
    return _table("Model", model) + "\n\n" + _table("Index", iinfo)


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
            except Exception as error:  # noqa: BLE001 - any decode failure: report it instead of a generic "Error"
                name = getattr(payload, "orig_name", None) or "the upload"
                return UnreadableUpload(f"Could not read {name} as an image ({type(error).__name__}). {UPLOAD_HINT}")

    return SafeImage


def build_app(encoder: Any, index: Any = None, title: str = "manyview search", *, compare: Collection | None = None,
              text_index: Any = None, collection: Collection | None = None, metrics_path: Any = None,
              map_points: int | None = None) -> "gr.Blocks":
    """The app as a ``gr.Blocks``. Either ``encoder`` + ``index`` (+ an optional caption ``text_index``) or
    a ready ``collection``; ``compare`` adds a second encoder/index pair to the Compare tab."""
    gr = _gradio()
    from app.compare_tab import build_compare_tab
    from app.curate_tab import build_curate_tab
    from app.diagnostics_tab import build_diagnostics_tab
    from app.map_tab import build_map_tab
    from app.search_tab import build_api_endpoints, build_search_tab

    if collection is None:
        indexes = {"images": index}
        if text_index is not None:
            indexes["captions"] = text_index
        collection = Collection(encoder=encoder, indexes=indexes, metrics_path=metrics_path)
        if map_points:
            collection.map_points = int(map_points)
    safe_image = _safe_image_class()
    main = collection.index
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        execution = encoder_execution(collection.encoder)
        gr.Markdown(f"## {html.escape(title)}\n{main.count:,} images indexed · {main.dim}-d embeddings"
                    + (f" · encoder: {html.escape(execution)}" if execution else ""), elem_id="mv-title")
        with gr.Tabs():
            with gr.Tab("Search", id="search", elem_id="mv-tab-search"):
                build_search_tab(collection, safe_image)
                with gr.Accordion("Model card", open=False, elem_id="mv-card"):
                    gr.Markdown(model_card_markdown(collection.encoder, main))
            with gr.Tab("Map", id="map", elem_id="mv-tab-map") as map_tab:
                build_map_tab(collection, map_tab)
            with gr.Tab("Diagnostics", id="diagnostics", elem_id="mv-tab-diagnostics") as diagnostics_tab:
                build_diagnostics_tab(collection, diagnostics_tab)
            with gr.Tab("Curate", id="curate", elem_id="mv-tab-curate") as curate_tab:
                build_curate_tab(collection, curate_tab)
            with gr.Tab("Compare", id="compare", elem_id="mv-tab-compare"):
                build_compare_tab(collection, compare, safe_image)
        build_api_endpoints(collection, safe_image)
    hide_internal_endpoints(demo)
    demo.manyview_collection = collection  # launch_app serves the JSON API (app.api) of it
    return demo


def hide_internal_endpoints(demo: "gr.Blocks", public: Sequence[str] = PUBLIC_ENDPOINTS) -> list[str]:
    """Make every event but the ``public`` API endpoints private: the page still runs them, while
    ``gradio_client`` neither lists nor calls them (the tabs' handlers take UI state, not a query).
    Returns the names hidden."""
    hidden = []
    for function in demo.fns.values():
        if function.api_name not in public and function.api_visibility != "private":
            function.api_visibility = "private"
            hidden.append(str(function.api_name))
    return hidden


def launch_app(demo: "gr.Blocks", host: str = "127.0.0.1", port: int = 7860, block: bool = True,
               auth: Sequence[tuple[str, str]] | None = None, max_upload: str | int = DEFAULT_MAX_UPLOAD,
               blocked: Sequence[str] = ()) -> str:
    """Serve ``demo`` on ``host:port`` (never a public share link) and return its local URL.

    ``auth``: (user, password) pairs for Gradio's login page; ``max_upload``: the largest accepted upload;
    ``blocked``: directories never served (see ``app.safety``). No ``allowed_paths`` are given, so Gradio
    serves only the files it wrote itself. With ``block`` the call then waits until the server is
    interrupted (Ctrl-C) and closes it. Raises ``OSError`` when the port cannot be bound.
    """
    demo.queue(default_concurrency_limit=2)
    _, url, _ = demo.launch(server_name=host, server_port=port, share=False, inbrowser=False, css=CSS,
                            prevent_thread_lock=True, show_error=False, footer_links=["settings"], quiet=True,
                            max_file_size=max_upload, auth=list(auth) if auth else None, allowed_paths=[],
                            blocked_paths=list(blocked) or None, ssr_mode=False)
    collection = getattr(demo, "manyview_collection", None)
    if collection is not None:
        from app.api import build_api, mount_api
        from app.safety import parse_size

        api = build_api(collection, auth=auth, max_upload=parse_size(max_upload),
                        session_user=lambda request: _session_user(demo, request))
        mount_api(demo.app, api)
    if block:
        demo.block_thread()
    return str(url)


def _session_user(demo: "gr.Blocks", request: Any) -> str | None:
    """The user logged in on the page (Gradio's login cookie), so the page's own session may use the JSON
    API too (thumbnail URLs in a logged-in browser)."""
    app = getattr(demo, "app", None)
    cookie_id, tokens = getattr(app, "cookie_id", None), getattr(app, "tokens", None)
    if cookie_id is None or not tokens:
        return None
    cookies = request.cookies
    token = cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")
    return tokens.get(token) if token else None
