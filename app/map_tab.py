"""The Map tab: a 2-D projection of a sample of the indexed embeddings as an interactive scatter.

PCA always (numpy SVD); UMAP as well when ``umap-learn`` is importable. Points are coloured by label
or by k-means cluster (numpy Lloyd iterations, k-means++ start). The collection is sampled down to
``Collection.map_points`` random images (2,000 by default): enough to show the structure, few enough
for an SVG the browser draws instantly.

Why a hand-written SVG in ``gr.HTML`` and not ``gr.Plot``/``gr.ScatterPlot``: hover thumbnails and a
click that reports *which* point was clicked are what the tab is for. ``gr.Plot`` (matplotlib, or
plotly, which is not installed) sends no point clicks back to Python; ``gr.ScatterPlot`` (Vega-Lite)
reports brushed x-ranges, not points, and cannot show images in its tooltip. ``gr.HTML``'s
``js_on_load`` can ``trigger`` an event with the point's sample id, and the hover thumbnails are
windows onto one JPEG sprite sheet of all sampled images, sent once inside the HTML.
"""
from __future__ import annotations

import base64
import html
import importlib.util
from typing import Any, Sequence

import numpy as np

from app.thumbnails import sprite_sheet

PALETTE = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974",
           "#64b5cd", "#1f3a93", "#e67e22", "#27ae60", "#8e44ad", "#16a085", "#d35400", "#2c3e50", "#f1c40f"]
SPRITE_CELL = 32
TIP_SCALE = 3  # hover thumbnails are shown at 3x the sprite cell (96 px)
VIEW = 1000  # SVG coordinate range
DEFAULT_CLUSTERS = 10


def umap_available() -> bool:
    return importlib.util.find_spec("umap") is not None


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    """The first two principal components of ``vectors`` [N, D] (centred; sign fixed so the largest
    loading is positive, which makes the picture reproducible)."""
    x = np.asarray(vectors, np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    axes = vt[:2]
    signs = np.sign(axes[np.arange(len(axes)), np.argmax(np.abs(axes), axis=1)])
    projected = x @ (axes * signs[:, None]).T
    if projected.shape[1] < 2:  # 1-d embeddings
        projected = np.pad(projected, ((0, 0), (0, 2 - projected.shape[1])))
    return projected.astype(np.float32)


def umap_2d(vectors: np.ndarray, seed: int = 0) -> np.ndarray:
    import umap  # optional dependency

    reducer = umap.UMAP(n_components=2, metric="cosine", random_state=seed, n_neighbors=min(15, len(vectors) - 1))
    return np.asarray(reducer.fit_transform(vectors), dtype=np.float32)


def kmeans(vectors: np.ndarray, k: int, iterations: int = 25, seed: int = 0) -> np.ndarray:
    """Cluster labels [N] from Lloyd's algorithm with a k-means++ start (squared Euclidean)."""
    x = np.asarray(vectors, np.float64)
    k = max(1, min(int(k), len(x)))
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        distance = np.min(((x[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1), axis=1)
        total = distance.sum()
        centres.append(x[rng.choice(len(x), p=distance / total)] if total > 0 else x[rng.integers(len(x))])
    centres_arr = np.asarray(centres)
    labels = np.zeros(len(x), dtype=np.int64)
    for step in range(iterations):
        distance = (x * x).sum(1)[:, None] - 2 * x @ centres_arr.T + (centres_arr ** 2).sum(1)[None]
        new_labels = np.argmin(distance, axis=1)
        if step > 0 and np.array_equal(new_labels, labels):
            break
        labels = new_labels
        for cluster in range(k):
            members = x[labels == cluster]
            if len(members):
                centres_arr[cluster] = members.mean(axis=0)
    return labels


def to_view(points: np.ndarray, margin: float = 20.0) -> np.ndarray:
    """Scale 2-D points into ``[margin, VIEW - margin]`` on both axes (y up)."""
    points = np.asarray(points, np.float64)
    low, high = points.min(axis=0), points.max(axis=0)
    span = np.where(high - low > 0, high - low, 1.0)
    scaled = margin + (points - low) / span * (VIEW - 2 * margin)
    scaled[:, 1] = VIEW - scaled[:, 1]
    return scaled


def colour_groups(records: Sequence[dict], clusters: np.ndarray | None, colour_by: str) -> tuple[list[int], list[str]]:
    """Per point, a group number, and the groups' names (labels sorted, or ``cluster 0..k-1``)."""
    if colour_by == "cluster" and clusters is not None:
        return [int(c) for c in clusters], [f"cluster {c}" for c in range(int(max(clusters)) + 1)]
    names = [str(r.get("label_name") or (r.get("label") if int(r.get("label", -1)) >= 0 else "") or "unlabelled")
             for r in records]
    order = sorted(set(names))
    lookup = {name: number for number, name in enumerate(order)}
    return [lookup[name] for name in names], order


def scatter_html(points: np.ndarray, ids: Sequence[int], records: Sequence[dict], groups: Sequence[int],
                 group_names: Sequence[str], sprite: bytes | None, columns: int, caption: str = "") -> str:
    """The SVG scatter, its legend and the hover tooltip, as one HTML string for ``gr.HTML``."""
    xy = to_view(points)
    circles = []
    for number, ((x, y), sample_id, record, group) in enumerate(zip(xy, ids, records, groups)):
        label = html.escape(f"#{sample_id} · {record.get('label_name') or record.get('caption') or ''}", quote=True)
        circles.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{PALETTE[group % len(PALETTE)]}" '
                       f'data-i="{number}" data-id="{int(sample_id)}" data-label="{label}"/>')
    legend = "".join(f'<span class="mv-key"><i style="background:{PALETTE[n % len(PALETTE)]}"></i>{html.escape(name)}</span>'
                     for n, name in enumerate(group_names[:len(PALETTE) * 2]))
    sprite_css = ""
    if sprite is not None:
        encoded = base64.b64encode(sprite).decode("ascii")
        sprite_css = (f"<style>.mv-thumb{{background-image:url(data:image/jpeg;base64,{encoded});"
                      f"background-size:{columns * SPRITE_CELL * TIP_SCALE}px auto;}}</style>")
    return (f'{sprite_css}<div class="mv-map-wrap" data-cols="{columns}" data-cell="{SPRITE_CELL * TIP_SCALE}">'
            f'<div class="mv-legend">{legend}</div>'
            f'<svg class="mv-scatter" viewBox="0 0 {VIEW} {VIEW}" preserveAspectRatio="xMidYMid meet">{"".join(circles)}</svg>'
            f'<div class="mv-tip"><div class="mv-thumb"></div><div class="mv-tip-text"></div></div>'
            f'<div class="mv-map-caption">{html.escape(caption)}</div></div>')


MAP_CSS = """
.mv-map-wrap { position: relative; }
.mv-scatter { width: 100%; max-height: 680px; background: #fafafa; border: 1px solid #ddd; border-radius: 6px; }
.mv-scatter circle { cursor: pointer; fill-opacity: 0.75; stroke: white; stroke-width: 0.8; }
.mv-scatter circle:hover { fill-opacity: 1; stroke: black; stroke-width: 2; }
.mv-legend { display: flex; flex-wrap: wrap; gap: 4px 12px; font-size: 0.85em; margin-bottom: 4px; }
.mv-key i { display: inline-block; width: 10px; height: 10px; border-radius: 5px; margin-right: 4px; }
.mv-tip { position: absolute; display: none; pointer-events: none; background: white; border: 1px solid #888;
          border-radius: 4px; padding: 4px; z-index: 10; box-shadow: 0 2px 6px rgba(0,0,0,.25); }
.mv-thumb { width: 96px; height: 96px; image-rendering: pixelated; }
.mv-tip-text { font-size: 0.8em; max-width: 160px; }
.mv-map-caption { font-size: 0.8em; color: #666; }
"""

# Event delegation on the component's root: the listeners survive every re-render of the SVG.
MAP_JS = """
element.addEventListener('mousemove', (event) => {
  const tip = element.querySelector('.mv-tip');
  const wrap = element.querySelector('.mv-map-wrap');
  if (!tip || !wrap) return;
  const dot = event.target.closest ? event.target.closest('circle[data-i]') : null;
  if (!dot) { tip.style.display = 'none'; return; }
  const i = Number(dot.dataset.i), cols = Number(wrap.dataset.cols), cell = Number(wrap.dataset.cell);
  tip.querySelector('.mv-thumb').style.backgroundPosition = `-${(i % cols) * cell}px -${Math.floor(i / cols) * cell}px`;
  tip.querySelector('.mv-tip-text').textContent = dot.dataset.label;
  const box = wrap.getBoundingClientRect();
  tip.style.left = (event.clientX - box.left + 14) + 'px';
  tip.style.top = (event.clientY - box.top + 14) + 'px';
  tip.style.display = 'block';
});
element.addEventListener('mouseleave', () => { const tip = element.querySelector('.mv-tip'); if (tip) tip.style.display = 'none'; });
element.addEventListener('click', (event) => {
  const dot = event.target.closest ? event.target.closest('circle[data-id]') : null;
  if (dot) trigger('click', {sample_id: dot.dataset.id});  // a string: ids exceed 2^53
});
"""


def map_html(collection: Any, projection: str = "PCA", colour_by: str = "label", clusters: int = DEFAULT_CLUSTERS) -> str:
    """The scatter for ``collection`` (projections, clusters and the sprite are cached on it)."""
    sample = collection.sample()
    count = min(len(sample.ids), collection.map_points)  # the sample is in random order: any prefix is random too
    ids, records, vectors = sample.ids[:count], sample.records[:count], sample.vectors[:count]
    if projection == "UMAP" and umap_available():
        points = collection.cached("umap", lambda: umap_2d(vectors, collection.seed))
    else:
        projection = "PCA"
        points = collection.cached("pca", lambda: pca_2d(vectors))
    labels = collection.cached(("kmeans", int(clusters)), lambda: kmeans(vectors, int(clusters), seed=collection.seed))
    sprite, columns = collection.cached("sprite", lambda: sprite_sheet(sample.images[:count], SPRITE_CELL))
    by_cluster = colour_by.startswith("k-means") or colour_by == "cluster"
    groups, names = colour_groups(records, labels, "cluster" if by_cluster else "label")
    caption = (f"{projection} of {count:,} of {collection.index.count:,} indexed images (random sample); "
               "hover for the image, click for its neighbours")
    return scatter_html(points, ids, records, groups, names, sprite, columns, caption)


def build_map_tab(collection: Any, tab: Any) -> None:
    """The tab's components and events (call inside ``gr.Tab``; ``tab`` draws the map when first opened)."""
    import gradio as gr

    from app.search import K_DEFAULT, K_MAX, K_MIN, SearchError, md_escape, neighbours_for_image, run_search, sample_image

    projections = ["PCA", "UMAP"] if umap_available() else ["PCA"]
    with gr.Row():
        projection = gr.Radio(projections, value="PCA", label="Projection" + ("" if umap_available() else " (pip install umap-learn for UMAP)"),
                              elem_id="mv-map-projection")
        colour = gr.Radio(["label", "k-means cluster"], value="label", label="Colour by", elem_id="mv-map-colour")
        clusters = gr.Slider(2, len(PALETTE), value=DEFAULT_CLUSTERS, step=1, label="clusters (k-means)", elem_id="mv-map-clusters")
        k_slider = gr.Slider(K_MIN, K_MAX, value=K_DEFAULT, step=1, label="neighbours of a clicked point", elem_id="mv-map-k")
    with gr.Row():
        with gr.Column(scale=3):
            scatter = gr.HTML("<p>Open this tab to draw the map.</p>", css_template=MAP_CSS, js_on_load=MAP_JS,
                              elem_id="mv-map", apply_default_css=False)
        with gr.Column(scale=2):
            status = gr.Markdown("Hover a point to see its image; click it for its neighbours.", elem_id="mv-map-status")
            gallery = gr.Gallery(label="Neighbours of the clicked point", columns=4, height="auto", object_fit="contain",
                                 allow_preview=False, format="png", elem_id="mv-map-gallery")

    def draw(projection_name: str, colour_by: str, cluster_count: float):
        try:
            return map_html(collection, projection_name, colour_by, int(cluster_count))
        except Exception as error:  # noqa: BLE001 - e.g. the shards are gone; say so in the tab
            return f"<p>⚠️ The map cannot be drawn: {html.escape(type(error).__name__)}: {html.escape(str(error))}</p>"

    def on_click(k: float, evt: gr.EventData):
        data = getattr(evt, "_data", None) or {}
        try:
            sample_id = int(data.get("sample_id"))
            record, picture = sample_image(collection.index, sample_id, collection.thumbs)
        except (TypeError, ValueError, SearchError) as error:
            return gr.skip(), f"⚠️ {md_escape(str(error))}"
        what = f"the map point #{sample_id} ({record.get('label_name') or record.get('key')})"
        items, _, text = run_search(lambda: neighbours_for_image(collection.encoder, collection.index, picture, int(k),
                                                                 thumbs=collection.thumbs), what)
        return items, text

    on_click.__annotations__["evt"] = gr.EventData
    controls = [projection, colour, clusters]
    tab.select(draw, controls, scatter)
    for control in controls:
        control.change(draw, controls, scatter)
    scatter.click(on_click, [k_slider], [gallery, status])
