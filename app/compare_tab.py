"""The Compare tab: the same query against two encoder/index pairs, side by side.

Started with ``python -m app --encoder A/onnx --index A/index --compare-encoder B/onnx --compare-index
B/index``. Each side encodes the query with its own encoder and searches its own index; when the two
indexes hold the same sample ids (two checkpoints over one collection) the overlap of the two result
lists is shown too. Clicking a result on either side searches both sides by that image.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from app.search import (
    K_DEFAULT, K_MAX, K_MIN, SearchError, encoder_execution, md_escape, neighbours_for_image, neighbours_for_text,
    run_search, sample_image, short,
)
from app.thumbnails import thumbnail


def side_title(collection: Any) -> str:
    model = dict((collection.encoder.info or {}).get("model") or {})
    parts = [str(model.get(name)) for name in ("objective", "backbone") if model.get(name)]
    if model.get("steps") is not None:
        parts.append(f"{model['steps']} steps")
    execution = encoder_execution(collection.encoder)
    if execution:
        parts.append(execution)
    where = collection.encoder_dir or "encoder"
    return f"**{collection.name}**: {' · '.join(parts) or 'model'} · {collection.index.count:,} images  \n`{where}`"


def overlap_line(ids_a: list[int], ids_b: list[int]) -> str:
    """E.g. ``3 of 8 results in common`` (by sample id)."""
    if not ids_a or not ids_b:
        return ""
    common = len(set(ids_a) & set(ids_b))
    return f"{common} of {max(len(ids_a), len(ids_b))} results in common (same sample ids)"


def build_compare_tab(left: Any, right: Any | None, safe_image: Any) -> None:
    import gradio as gr

    if right is None:
        gr.Markdown("Start the app with a second encoder and index to compare them on the same queries:\n\n"
                    "`python -m app --encoder A/onnx --index A/index --compare-encoder B/onnx --compare-index B/index`",
                    elem_id="mv-cmp-help")
        return
    sides = (left, right)
    # Result overlap means something only when the two indexes hold the same samples (two checkpoints).
    probe = np.asarray(right.index.ids[:1000])
    same_samples = bool(len(probe)) and bool(np.isin(probe, np.asarray(left.index.ids)).mean() > 0.5)
    with gr.Row():
        with gr.Column(scale=1, min_width=280):
            query = gr.Textbox(label="Text query", placeholder="a photo of a ship", elem_id="mv-cmp-query")
            text_button = gr.Button("Search both", variant="primary", elem_id="mv-cmp-text-search")
            upload = safe_image(label="Query image", type="pil", sources=["upload", "clipboard"], height=180,
                                elem_id="mv-cmp-upload")
            k_slider = gr.Slider(K_MIN, K_MAX, value=K_DEFAULT, step=1, label="k (results)", elem_id="mv-cmp-k")
            overlap = gr.Markdown("", elem_id="mv-cmp-overlap")
        galleries, statuses = [], []
        for side, letter in zip(sides, "ab"):
            with gr.Column(scale=2):
                gr.Markdown(side_title(side), elem_id=f"mv-cmp-title-{letter}")
                statuses.append(gr.Markdown("", elem_id=f"mv-cmp-status-{letter}"))
                galleries.append(gr.Gallery(columns=4, height="auto", object_fit="contain", allow_preview=False,
                                            format="png", show_label=False, elem_id=f"mv-cmp-gallery-{letter}"))
    ids_states = [gr.State([]), gr.State([])]
    outputs = [galleries[0], ids_states[0], statuses[0], galleries[1], ids_states[1], statuses[1], overlap]

    def both(make_search, what: str, k: float) -> tuple:
        results = [run_search(lambda side=side: make_search(side, int(k)), what) for side in sides]
        (gallery_a, ids_a, status_a), (gallery_b, ids_b, status_b) = results
        overlap_text = overlap_line(ids_a, ids_b) if same_samples else "The two indexes hold different samples."
        return gallery_a, ids_a, status_a, gallery_b, ids_b, status_b, overlap_text

    def on_text(text: str, k: float):
        return both(lambda side, n: neighbours_for_text(side.encoder, side.index, text, n, thumbs=side.thumbs),
                    f"'{short((text or '').strip())}'", k)

    def on_image(image: Any, k: float):
        return both(lambda side, n: neighbours_for_image(side.encoder, side.index, image, n, thumbs=side.thumbs),
                    "the uploaded image", k)

    def clicked(side: Any, ids: list[int], k: float, evt: gr.SelectData):
        position = evt.index if isinstance(evt.index, int) else (evt.index or [0])[0]
        if not ids or not 0 <= position < len(ids):
            return (gr.skip(),) * 8
        try:
            record, picture = sample_image(side.index, int(ids[position]), side.thumbs)
        except SearchError as error:
            return gr.skip(), gr.skip(), f"⚠️ {md_escape(str(error))}", gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        what = f"the clicked {record.get('label_name') or record.get('key')} image from {side.name}"
        result = both(lambda s, n: neighbours_for_image(s.encoder, s.index, picture, n, thumbs=s.thumbs), what, k)
        return (*result, thumbnail(picture))

    def on_select_a(ids, k, evt: gr.SelectData):
        return clicked(left, ids, k, evt)

    def on_select_b(ids, k, evt: gr.SelectData):
        return clicked(right, ids, k, evt)

    for handler in (on_select_a, on_select_b):
        handler.__annotations__["evt"] = gr.SelectData

    text_button.click(on_text, [query, k_slider], outputs)
    query.submit(on_text, [query, k_slider], outputs)
    upload.upload(on_image, [upload, k_slider], outputs)
    galleries[0].select(on_select_a, [ids_states[0], k_slider], [*outputs, upload])
    galleries[1].select(on_select_b, [ids_states[1], k_slider], [*outputs, upload])
