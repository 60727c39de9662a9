"""The Search tab: text / image / sample queries, "more like this", k, filters, history, index choice.

Every query goes through ``execute(entry, ...)`` where ``entry`` is a history entry
(``{"kind": "text", "query": ...}``, ``{"kind": "id", "id": ...}`` or ``{"kind": "image", "image": ...}``),
so re-running a history entry is the same code path as the original query. With a CoCa export the status of an
image or sample query also shows the query image's generated caption (``export/captions.py``).
"""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from app.search import (
    K_DEFAULT, K_MAX, K_MIN, ResultFilter, SearchError, caption_status, find_history, history_label, load_query_image,
    md_escape, neighbours_for_image, neighbours_for_text, push_history, run_search, sample_image, short,
)
from app.thumbnails import thumbnail

logger = logging.getLogger(__name__)

HISTORY_IMAGE_SIDE = 128  # uploaded query images kept in the (per-browser-session) history are this small


def label_choices(index: Any, limit: int = 200) -> list[str]:
    """Distinct label names of the collection (for the filter), sorted; [] when there are none."""
    metadata = getattr(index, "metadata", None)
    if metadata is None:
        return []
    import pyarrow.compute as pc

    names = [str(name) for name in pc.unique(metadata.column("label_name")).to_pylist() if name]
    return sorted(names)[:limit]


def execute(collection: Any, entry: dict, k: Any, labels: Any, words: str | None, index_name: str | None) -> tuple:
    """Run one query entry; returns (gallery items, result ids, status Markdown, query image or None)."""
    index = collection.index_named(index_name)
    where = f" in the {index_name}" if index_name and index is not collection.index else ""
    result_filter = ResultFilter.parse(labels, words)
    wanted = int(k or K_DEFAULT)
    encoder, thumbs = collection.encoder, collection.thumbs
    kind = entry.get("kind")
    query_image = None
    if kind == "text":
        query = str(entry.get("query") or "")
        gallery, ids, status = run_search(
            lambda: neighbours_for_text(encoder, index, query, wanted, result_filter, thumbs),
            f"'{short(query.strip())}'{where}", wanted, result_filter)
    elif kind == "id":
        try:
            record, query_image = sample_image(collection.index, int(entry["id"]), thumbs)
        except (SearchError, ValueError, TypeError) as error:
            return [], [], f"⚠️ {md_escape(str(error))}", None
        entry.setdefault("name", record.get("label_name") or record.get("key"))
        what = (entry.get("what") or f"sample #{entry['id']} ({entry['name']})") + where
        gallery, ids, status = run_search(
            lambda: neighbours_for_image(encoder, index, query_image, wanted, result_filter, thumbs),
            what, wanted, result_filter)
    else:
        image = entry.get("image")
        gallery, ids, status = run_search(
            lambda: neighbours_for_image(encoder, index, image, wanted, result_filter, thumbs),
            (entry.get("what") or "the uploaded image") + where, wanted, result_filter)
    if kind != "text" and not status.startswith("⚠️"):  # CoCa exports: the query image's generated caption
        status += caption_status(getattr(collection, "captioner", None),
                                 query_image if kind == "id" else entry.get("image"))
    return gallery, ids, status, query_image


def build_search_tab(collection: Any, safe_image: Any) -> None:
    """The tab's components and events (call inside ``gr.Tab``)."""
    import gradio as gr

    encoder, index = collection.encoder, collection.index
    has_text = bool(encoder.has_text)
    with gr.Row():
        with gr.Column(scale=1, min_width=300):
            with gr.Group(visible=has_text):
                query = gr.Textbox(label="Text query", placeholder="a photo of a ship", elem_id="mv-query",
                                   interactive=has_text)
                text_button = gr.Button("Search text", variant="primary", elem_id="mv-text-search",
                                        interactive=has_text)
            if not has_text:
                gr.Markdown("*This encoder has no text tower: search by image.*", elem_id="mv-no-text")
            upload = safe_image(label="Query image (upload or paste)", type="pil", sources=["upload", "clipboard"],
                                height=200, elem_id="mv-upload")
            with gr.Row():
                image_button = gr.Button("Search image", elem_id="mv-image-search")
                random_button = gr.Button("Random sample", elem_id="mv-random")
            sample_box = gr.Textbox(label="Sample id (Enter searches by it)", elem_id="mv-sample-id", max_lines=1)
            k_slider = gr.Slider(K_MIN, K_MAX, value=K_DEFAULT, step=1, label="k (results)", elem_id="mv-k")
            choices = list(collection.indexes)
            index_choice = gr.Radio(choices, value=choices[0], label="Search in", visible=len(choices) > 1,
                                    elem_id="mv-index")
            with gr.Accordion("Filter results", open=False, elem_id="mv-filter"):
                label_filter = gr.Dropdown(label_choices(index), multiselect=True, label="Label is one of",
                                           elem_id="mv-filter-labels")
                word_filter = gr.Textbox(label="Caption contains (all words)", elem_id="mv-filter-words", max_lines=1)
            history_box = gr.Dropdown([], label="Query history (pick one to run it again)", elem_id="mv-history",
                                      interactive=True)
        with gr.Column(scale=3):
            hint = "Type a query or upload an image." if has_text else "Upload an image."
            status = gr.Markdown(f"{hint} Click a result for more like it.", elem_id="mv-status")
            gallery = gr.Gallery(label="Neighbours", columns=6, height="auto", object_fit="contain",
                                 allow_preview=False, format="png", elem_id="mv-gallery")
    ids_state = gr.State([])
    history_state = gr.State([])
    entry_state = gr.State(None)  # the query just answered, for the history step that follows it
    filters = [k_slider, label_filter, word_filter, index_choice]
    outputs = [gallery, ids_state, status, entry_state, upload]

    def finish(entry: dict, k: Any, labels: Any, words: str, index_name: str, keep_image: bool = True,
               clear_selection: bool = False):
        gallery_items, ids, status_text, query_image = execute(collection, entry, k, labels, words, index_name)
        answered = None if status_text.startswith("⚠️") else entry
        image_update = thumbnail(query_image) if query_image is not None else gr.skip()
        # A plain list for API clients; after a click the selection highlight must go as well.
        items = gr.Gallery(value=gallery_items, selected_index=None) if clear_selection else gallery_items
        return items, ids, status_text, answered, image_update if keep_image else gr.skip()

    def record(entry: dict | None, history: list):
        """Runs after the answer is sent (``.then``), so the history costs a query nothing."""
        if entry is None:
            return gr.skip(), history
        history = push_history(history, entry)
        return gr.Dropdown(choices=[history_label(item) for item in history], value=None), history

    def on_text(text: str, k, labels, words, index_name, history):
        return finish({"kind": "text", "query": (text or "").strip()}, k, labels, words, index_name)

    def on_image(image: Any, k, labels, words, index_name, history):
        entry: dict = {"kind": "image", "image": image, "what": "the uploaded image", "time": time.strftime("%H:%M:%S")}
        try:
            small = load_query_image(image)
            small.thumbnail((HISTORY_IMAGE_SIDE, HISTORY_IMAGE_SIDE))
            entry["image"] = small
        except SearchError:
            pass  # execute() reports it
        return finish(entry, k, labels, words, index_name, keep_image=False)

    def on_random(k, labels, words, index_name, history):
        sample_id = int(np.random.default_rng().choice(index.ids))
        return finish({"kind": "id", "id": sample_id}, k, labels, words, index_name)

    def on_sample_id(text: str, k, labels, words, index_name, history):
        try:
            sample_id = int(str(text).strip().lstrip("#"))
        except ValueError:
            message = f"⚠️ {md_escape(repr(text))} is not a sample id (a whole number)."
            return gr.skip(), gr.skip(), message, None, gr.skip()
        return finish({"kind": "id", "id": sample_id}, k, labels, words, index_name)

    def on_history(label: str, k, labels, words, index_name, history):
        entry = find_history(history, label)
        if entry is None:
            return gr.skip(), gr.skip(), gr.skip(), None, gr.skip()
        return finish(entry, k, labels, words, index_name)

    def on_select(ids: list[int], k, labels, words, index_name, history, evt: gr.SelectData):
        position = evt.index if isinstance(evt.index, int) else (evt.index or [0])[0]
        if not ids or not 0 <= position < len(ids):
            return gr.skip(), gr.skip(), "⚠️ That result is no longer available; search again.", None, gr.skip()
        sample_id = int(ids[position])
        try:
            record = index.records([sample_id])[0]
        except (KeyError, IndexError) as error:
            return gr.skip(), gr.skip(), f"⚠️ {md_escape(str(error))}", None, gr.skip()
        label = record.get("label_name") or record.get("caption") or f"#{sample_id}"
        what = f"the clicked {label} image ({record.get('key', sample_id)})"
        return finish({"kind": "id", "id": sample_id, "what": what, "name": label}, k, labels, words, index_name,
                      clear_selection=True)

    on_select.__annotations__["evt"] = gr.SelectData  # resolved here: this module's annotations are strings

    inputs = [*filters, history_state]
    events = []
    private = {"api_visibility": "private"}  # the page's own events; programs use build_api_endpoints' ones
    if has_text:
        events.append(text_button.click(on_text, [query, *inputs], outputs, **private))
        events.append(query.submit(on_text, [query, *inputs], outputs, **private))
    events.append(image_button.click(on_image, [upload, *inputs], outputs, **private))
    events.append(upload.upload(on_image, [upload, *inputs], outputs, **private))
    events.append(random_button.click(on_random, inputs, outputs, **private))
    events.append(sample_box.submit(on_sample_id, [sample_box, *inputs], outputs, **private))
    events.append(history_box.input(on_history, [history_box, *inputs], outputs, api_visibility="private"))
    events.append(gallery.select(on_select, [ids_state, *inputs], outputs, api_visibility="private"))
    for event in events:
        event.then(record, [entry_state, history_state], [history_box, history_state], api_visibility="private")


API_ENDPOINTS = ("search_text", "search_image", "search_id")


def api_root_url(request: Any) -> str:
    """The app's root URL as the caller reached it (for thumbnail URLs); "" when the request is unknown."""
    inner = getattr(request, "request", None)
    base = getattr(inner, "base_url", None)
    return str(base).rstrip("/") if base is not None else ""


def build_api_endpoints(collection: Any, safe_image: Any) -> None:
    """The Gradio endpoints for programs (``gradio_client``), on hidden components so that only the query is
    required: ``/search_text``, ``/search_image``, ``/search_id``. Each answers ``app.api.run_query``'s
    ``{"results": [{"id", "key", "shard", "score", "label", "label_id", "caption", "thumbnail"}], ...}``
    and raises ``gr.Error`` (an exception with the message in the client) for bad input."""
    import gradio as gr

    from app.api import ApiQuery, run_query

    index_names = list(collection.indexes)
    with gr.Group(visible=False, elem_id="mv-api"):
        text_in = gr.Textbox(label="query", visible=False)
        image_in = safe_image(label="image", type="pil", visible=False)
        id_in = gr.Number(label="id", precision=0, visible=False)
        k_in = gr.Number(value=K_DEFAULT, label="k", precision=0, visible=False)
        labels_in = gr.Dropdown(label_choices(collection.index), value=[], multiselect=True, allow_custom_value=True,
                                label="labels", visible=False)
        words_in = gr.Textbox(value="", label="words", visible=False)
        index_in = gr.Textbox(value=index_names[0], label="index", visible=False)
        answer = gr.JSON(label="results", visible=False)

    def respond(kind: str, value: Any, k: Any, labels: Any, words: Any, index_name: Any, request: Any) -> dict:
        try:
            return run_query(collection, ApiQuery(kind, value, k, labels, words, index_name), api_root_url(request))
        except SearchError as error:
            raise gr.Error(str(error), print_exception=False) from error
        except Exception as error:  # noqa: BLE001 - the client gets the reason, the log the traceback
            logger.exception("API %s search failed", kind)
            raise gr.Error(f"Search failed ({type(error).__name__}): {error}", print_exception=False) from error

    def search_text(query: str, k: int = K_DEFAULT, labels: list | None = None, words: str = "",
                    index: str = index_names[0], request: gr.Request = None) -> dict:
        """The k samples nearest to a text query (image-text encoders). Answers {"results": [{"id", "key",
        "shard", "score", "label", "label_id", "caption", "thumbnail"}, ...], "count", "elapsed_ms"}."""
        if query is None or not str(query).strip():
            raise gr.Error("Type a text query first.", print_exception=False)
        return respond("text", str(query), k, labels, words, index, request)

    def search_image(image: Any, k: int = K_DEFAULT, labels: list | None = None, words: str = "",
                     index: str = index_names[0], request: gr.Request = None) -> dict:
        """The k samples nearest to an image (``gradio_client.handle_file(path or URL)``). Same answer as
        /search_text."""
        return respond("image", image, k, labels, words, index, request)

    def search_id(id: int, k: int = K_DEFAULT, labels: list | None = None, words: str = "",  # noqa: A002
                  index: str = index_names[0], request: gr.Request = None) -> dict:
        """"More like this": the k samples nearest to an indexed sample (its id). Same answer as /search_text."""
        if id is None:
            raise gr.Error("Give a sample id (a whole number, e.g. a result's id).", print_exception=False)
        return respond("id", id, k, labels, words, index, request)

    for function in (search_text, search_image, search_id):  # resolved here: this module's annotations are strings
        function.__annotations__["request"] = gr.Request
    shared = [k_in, labels_in, words_in, index_in]
    gr.on([], search_text, [text_in, *shared], answer, api_name="search_text", show_progress="hidden")
    gr.on([], search_image, [image_in, *shared], answer, api_name="search_image", show_progress="hidden")
    gr.on([], search_id, [id_in, *shared], answer, api_name="search_id", show_progress="hidden")
