"""The Map tab: every indexed point (up to a million) in 2-D, drawn with WebGL, coloured by any field.

What it does:

* draws the projection (``app.projection``: PCA always, UMAP when ``umap-learn`` is installed) of every
  indexed point, computed once and cached beside the index (``RUN/index/map/``);
* colours points by label, k-means cluster (faiss), split, shard, any extra metadata column, or a
  curation table's field (``RUN/index/curation/*.parquet`` from ``python -m index.curate``: the
  near-duplicate group, uniqueness and other per-id scores), read when the tables are there;
* box or lasso selection opens the selected samples as a gallery; their ids go to Python (a CSV to download);
* a text query (or ``#id``) highlights its nearest neighbours on the map; a click on a point does the same
  for that point's neighbours;
* hover shows what a point is: its label and id at once, its thumbnail a moment later (fetched per point).

Why a small hand-written WebGL2 renderer inside ``gr.HTML`` and not plotly's ``Scattergl`` or
``embedding-atlas``: ``gr.Plot`` only has a ``change`` event, so plotly's lasso never reaches Python,
and its figure travels as JSON (a million points is ~40 MB of text); plotly is also not installed and
the test browser cannot fetch it from a CDN. ``embedding-atlas`` is its own web app/widget, not a
Gradio component. ``gr.HTML`` (Gradio >= 6) gives ``js_on_load`` with ``trigger`` (events with a
payload to Python), ``watch`` (react to new values) and ``server`` functions (plain HTTP calls into
Python that return JSON): the points travel once per projection as uint16 coordinates in base64
(4 bytes a point), the colours once per field as one byte a point, and a new highlight or legend is a
few hundred bytes. The shaders draw a million points in a few milliseconds even on a software GL.

The selection is computed on both sides from the same uint16 coordinates: the browser dims what is
outside at once, Python computes the exact ids (numpy for a box, ``matplotlib.path`` for a lasso).
"""
from __future__ import annotations

import base64
import csv
import io
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from app.projection import MAP_LIMIT, MapDataError, MapLayout, cluster_labels, map_layout, umap_available

PALETTE = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974",
           "#64b5cd", "#1f3a93", "#e67e22", "#27ae60", "#8e44ad", "#16a085", "#d35400", "#2c3e50", "#f1c40f"]
MISSING_COLOUR = "#d4d4d4"
HIGHLIGHT_COLOUR = "#ff1493"  # palette slot 255: search results and a clicked point's neighbours
RAMP = ["#440154", "#3b528b", "#21918c", "#5ec962", "#fde725"]  # viridis stops for continuous fields
RAMP_STEPS = 254  # codes 0..253 on the ramp, 254 = missing
LEGEND_ENTRIES = 24
DEFAULT_CLUSTERS = 10
GALLERY_LIMIT = 48
BASE_FIELDS = ["label", "k-means cluster", "split", "shard"]
CURATION_DIR = "curation"
FIELD_ALIASES = {("near_duplicates", "group"): "duplicate group", ("uniqueness", "uniqueness"): "uniqueness",
                 ("uniqueness", "score"): "uniqueness"}
SKIPPED_COLUMNS = {"id", "key", "caption", "label", "label_name", "shard"}


class MapFieldError(ValueError):
    """An unknown colour field, or one whose table cannot be read (the message names the choices)."""


@dataclass
class Colouring:
    """One byte per point (a palette slot), the palette (hex) and the legend rows (name, colour, count)."""

    field: str
    codes: np.ndarray
    palette: list[str]
    legend: list[tuple[str, str, int]] = field(default_factory=list)
    continuous: bool = False


# -- colour fields -----------------------------------------------------------------------------------


def categorical_codes(field_name: str, codes: np.ndarray, names: Sequence[str],
                      missing_name: str = "none") -> Colouring:
    """Categories (``codes`` into ``names``, -1 missing) on the palette, largest first; beyond its 18 colours
    they repeat and the legend says so. Missing points are light grey."""
    codes = np.asarray(codes, dtype=np.int64)
    present = codes >= 0
    counts = np.bincount(codes[present], minlength=len(names))
    used = [i for i in range(len(names)) if counts[i]]
    order = sorted(used, key=lambda i: (-counts[i], _natural(str(names[i]))))
    rank = np.zeros(max(len(names), 1), dtype=np.int64)
    rank[order] = np.arange(len(order))
    out = np.full(len(codes), len(PALETTE), dtype=np.uint8)
    out[present] = (rank[codes[present]] % len(PALETTE)).astype(np.uint8)
    legend = [(str(names[i]), PALETTE[rank[i] % len(PALETTE)], int(counts[i])) for i in order[:LEGEND_ENTRIES]]
    if len(order) > LEGEND_ENTRIES:
        rest = int(sum(counts[i] for i in order[LEGEND_ENTRIES:]))
        legend.append((f"… {len(order) - LEGEND_ENTRIES:,} more (colours repeat)", "#ffffff", rest))
    if (~present).any():
        legend.append((missing_name, MISSING_COLOUR, int((~present).sum())))
    return Colouring(field_name, out, PALETTE + [MISSING_COLOUR], legend)


def _natural(text: str) -> tuple:
    """Sort key putting ``cluster 2`` before ``cluster 10``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


def _ramp(fraction: float) -> str:
    position = min(max(fraction, 0.0), 1.0) * (len(RAMP) - 1)
    low = int(np.floor(position))
    high = min(low + 1, len(RAMP) - 1)
    mix = position - low
    a, b = (np.array([int(c[i:i + 2], 16) for i in (1, 3, 5)]) for c in (RAMP[low], RAMP[high]))
    return "#" + "".join(f"{int(round(v)):02x}" for v in a * (1 - mix) + b * mix)


def continuous(field_name: str, values: Sequence[float], missing_name: str = "none") -> Colouring:
    """Values on a viridis ramp (min to max, ``RAMP_STEPS`` steps); NaN is missing."""
    numbers = np.asarray(values, dtype=np.float64)
    present = np.isfinite(numbers)
    codes = np.full(len(numbers), RAMP_STEPS, dtype=np.uint8)
    palette = [_ramp(step / (RAMP_STEPS - 1)) for step in range(RAMP_STEPS)] + [MISSING_COLOUR]
    legend: list[tuple[str, str, int]] = []
    if present.any():
        low, high = float(numbers[present].min()), float(numbers[present].max())
        span = high - low or 1.0
        codes[present] = np.rint((numbers[present] - low) / span * (RAMP_STEPS - 1)).astype(np.uint8)
        for step in range(5):
            legend.append((f"{low + span * step / 4:.4g}", palette[round(step / 4 * (RAMP_STEPS - 1))], 0))
    if (~present).any():
        legend.append((missing_name, MISSING_COLOUR, int((~present).sum())))
    return Colouring(field_name, codes, palette, legend, continuous=True)


def split_name(shard: str | None) -> str:
    """The split a shard belongs to, from its file name (``train-000001.tar.gz`` -> ``train``), else its folder."""
    if not shard:
        return ""
    path = Path(str(shard))
    stem = re.sub(r"[-_.]*\d.*$", "", path.name.split(".")[0])
    return stem or path.parent.name


def _column(index: Any, name: str, rows: np.ndarray) -> tuple[np.ndarray, list[Any]]:
    """A metadata column at ``rows`` as (codes, distinct values), -1 for null: dictionary encoding keeps a
    million strings fast."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = index.metadata.column(name).take(pa.array(rows))
    encoded = pc.dictionary_encode(column).combine_chunks()
    codes = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    return codes, encoded.dictionary.to_pylist()


def _relabel(codes: np.ndarray, values: list[Any], rename: Any) -> tuple[np.ndarray, list[str]]:
    """Codes and names after ``rename`` (value -> name, "" for missing), merging values that share a name."""
    names = ["" if value is None else str(rename(value)) for value in values]
    distinct = sorted({name for name in names if name})
    lookup = {name: number for number, name in enumerate(distinct)}
    mapping = np.array([lookup.get(name, -1) for name in names] + [-1], dtype=np.int64)
    return mapping[np.where(codes >= 0, codes, len(names))], distinct


def curation_tables(index: Any) -> dict[str, Path]:
    """``RUN/index/curation/*.parquet`` by stem (none when ``python -m index.curate`` has not run)."""
    directory = Path(index.directory) / CURATION_DIR
    return {path.stem: path for path in sorted(directory.glob("*.parquet"))} if directory.is_dir() else {}


def curation_fields(index: Any) -> dict[str, tuple[Path, str]]:
    """Colour fields from the curation tables: ``field name -> (table, column)`` for each table with an
    ``id`` column: its ``group`` column and its numeric columns (``near_duplicates`` group is "duplicate group")."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    found: dict[str, tuple[Path, str]] = {}
    for stem, path in curation_tables(index).items():
        try:
            schema = pq.read_schema(path)
        except Exception:  # noqa: BLE001 - a table being written or damaged is left out, not fatal
            continue
        if "id" not in schema.names:
            continue
        for column in schema:
            if column.name == "id" or column.name in ("key", "shard", "caption"):
                continue
            if column.name == "group" or pa.types.is_floating(column.type) or pa.types.is_integer(column.type) \
                    or pa.types.is_boolean(column.type):
                name = FIELD_ALIASES.get((stem, column.name), f"{stem}: {column.name}")
                found.setdefault(name, (path, column.name))
    return found


def metadata_fields(index: Any) -> list[str]:
    """Extra metadata columns (beyond the standard ones) that can colour the map."""
    return [name for name in index.metadata.column_names if name not in SKIPPED_COLUMNS and name != "split"]


def colour_fields(index: Any) -> list[str]:
    """Every field the map can be coloured by, in the order the dropdown shows them."""
    return BASE_FIELDS + metadata_fields(index) + list(curation_fields(index))


def _by_id(layout: MapLayout, ids: np.ndarray, values: np.ndarray, fill: Any) -> np.ndarray:
    """``values`` (one per id) laid out by map position; ``fill`` where an id has none (an id's first row wins)."""
    values = np.asarray(values)
    out = np.full(layout.count, fill, dtype=values.dtype if len(values) else np.float64)
    if not len(ids) or not layout.count:
        return out
    first = np.unique(np.asarray(ids, dtype=np.int64), return_index=True)[1]
    ids, values = np.asarray(ids, dtype=np.int64)[first], values[first]
    order = np.argsort(layout.ids, kind="stable")
    at = np.minimum(np.searchsorted(layout.ids[order], ids), len(order) - 1)
    hit = layout.ids[order][at] == ids
    out[order[at[hit]]] = values[hit]
    return out


def colouring(index: Any, layout: MapLayout, field_name: str, clusters: int = DEFAULT_CLUSTERS,
              seed: int = 0) -> Colouring:
    """The colouring of the layout's points by ``field_name`` (one of ``colour_fields(index)``)."""
    if field_name == "label":
        codes, values = _column(index, "label_name", layout.rows)
        return categorical_codes("label", *_relabel(codes, values, str), "unlabelled")
    if field_name in ("k-means cluster", "cluster"):
        labels = cluster_labels(index, layout, clusters, seed)
        names = [f"cluster {c}" for c in range(int(labels.max(initial=0)) + 1)]
        return categorical_codes("k-means cluster", labels, names)
    if field_name == "split" and "split" not in index.metadata.column_names:
        codes, values = _column(index, "shard", layout.rows)
        return categorical_codes("split", *_relabel(codes, values, split_name))
    if field_name == "shard":
        codes, values = _column(index, "shard", layout.rows)
        return categorical_codes("shard", *_relabel(codes, values, lambda shard: Path(str(shard)).name))
    if field_name == "split" or field_name in metadata_fields(index):
        codes, values = _column(index, field_name, layout.rows)
        present = [v for v in values if v is not None]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present)
        if len(present) > LEGEND_ENTRIES and numeric:
            numbers = np.array([np.nan if v is None else float(v) for v in values] + [np.nan])
            return continuous(field_name, numbers[np.where(codes >= 0, codes, len(values))])
        return categorical_codes(field_name, *_relabel(codes, values, str))
    tables = curation_fields(index)
    if field_name not in tables:
        raise MapFieldError(f"cannot colour by {field_name!r}; choose one of {', '.join(colour_fields(index))}")
    import pyarrow.parquet as pq

    path, column = tables[field_name]
    table = pq.read_table(path, columns=["id", column])
    ids = table.column("id").to_numpy().astype(np.int64)
    values = table.column(column).to_pylist()
    if column == "group":
        names = sorted({str(v) for v in values if v is not None}, key=_natural)
        lookup = {name: number for number, name in enumerate(names)}
        codes = np.array([-1 if v is None else lookup[str(v)] for v in values], dtype=np.int64)
        placed = _by_id(layout, ids, codes, -1)
        return categorical_codes(field_name, placed, [f"group {name}" for name in names], "not in a group")
    numbers = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    return continuous(field_name, _by_id(layout, ids, numbers, np.nan), "not scored")


# -- selection ---------------------------------------------------------------------------------------


def selected_positions(layout: MapLayout, shape: str, polygon: Sequence[Sequence[float]]) -> np.ndarray:
    """Map positions inside a ``box`` (two corners) or ``lasso`` (a polygon), in the layout's uint16 coordinates."""
    corners = np.asarray(polygon, dtype=np.float64)
    if corners.ndim != 2 or corners.shape[1] != 2 or not np.all(np.isfinite(corners)):
        raise MapFieldError("a selection needs a list of [x, y] points")
    points = layout.quantised.astype(np.float64)
    if shape == "box":
        if len(corners) < 2:
            raise MapFieldError("a box selection needs two corners")
        low, high = corners.min(axis=0), corners.max(axis=0)
        inside = np.all((points >= low) & (points <= high), axis=1)
    elif shape == "lasso":
        if len(corners) < 3:
            raise MapFieldError("a lasso selection needs at least three points")
        from matplotlib.path import Path as PolygonPath

        low, high = corners.min(axis=0), corners.max(axis=0)
        candidates = np.flatnonzero(np.all((points >= low) & (points <= high), axis=1))
        inside = np.zeros(len(points), dtype=bool)
        inside[candidates] = PolygonPath(corners).contains_points(points[candidates])
    else:
        raise MapFieldError(f"unknown selection shape {shape!r}; use box or lasso")
    return np.flatnonzero(inside)


def ids_csv(ids: np.ndarray) -> str:
    """The selected ids as a CSV file (``id`` per line) in a fresh temporary directory; returns its path."""
    directory = Path(tempfile.mkdtemp(prefix="manyview-map-"))
    path = directory / f"selected-{len(ids)}.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id"])
        writer.writerows([[int(i)] for i in ids])
    return str(path)


# -- what the browser gets ---------------------------------------------------------------------------


def encode(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def layout_key(layout: MapLayout) -> str:
    return f"{layout.fingerprint}-{layout.projection}-{layout.count}"


def colour_key(layout: MapLayout, colouring_: Colouring, clusters: int) -> str:
    return f"{layout_key(layout)}-{colouring_.field}-{clusters if colouring_.field == 'k-means cluster' else ''}"


def points_payload(layout: MapLayout) -> dict:
    """The coordinates as interleaved little-endian uint16 x, y (base64) and the extent of each axis."""
    extent = layout.quantised.max(axis=0).tolist() if layout.count else [1, 1]
    return {"key": layout_key(layout), "count": layout.count, "xy": encode(layout.quantised.astype("<u2")),
            "extent": [max(1, int(e)) for e in extent]}


def colours_payload(layout: MapLayout, colouring_: Colouring, clusters: int) -> dict:
    palette = (colouring_.palette + [MISSING_COLOUR] * 256)[:255] + [HIGHLIGHT_COLOUR]
    return {"key": colour_key(layout, colouring_, clusters), "codes": encode(colouring_.codes.astype(np.uint8)),
            "palette": palette}


def thumbnail_data_url(image: Any, side: int = 96) -> str:
    """A small PNG of ``image`` as a data URL (tiny images scaled up, crisp)."""
    from PIL import Image

    picture = image.convert("RGB")
    scale = max(1, side // max(1, max(picture.size)))
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    picture.thumbnail((side * 2, side * 2))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class MapModel:
    """The tab's state on the server side for one collection: layouts and colourings, cached per key."""

    def __init__(self, collection: Any, limit: int | None = None) -> None:
        self.collection = collection
        self.limit = int(limit or getattr(collection, "map_limit", MAP_LIMIT))

    @property
    def index(self) -> Any:
        return self.collection.index

    def layout(self, projection: str) -> MapLayout:
        name = "UMAP" if projection == "UMAP" and umap_available() else "PCA"
        return self.collection.cached(("map-layout", name, self.limit),
                                      lambda: map_layout(self.index, name, self.limit, self.collection.seed))

    def colouring(self, layout: MapLayout, field_name: str, clusters: int) -> Colouring:
        key = ("map-colour", layout_key(layout), field_name, int(clusters) if field_name == "k-means cluster" else 0)
        tables = curation_tables(self.index)
        stamp = tuple((p.name, p.stat().st_mtime_ns) for p in tables.values()) if field_name not in BASE_FIELDS else ()
        return self.collection.cached(key + stamp, lambda: colouring(self.index, layout, field_name, int(clusters),
                                                                      self.collection.seed))

    def state(self, projection: str, field_name: str, clusters: int) -> dict:
        """The value of the map component: what to draw (keys the browser fetches by), legend and caption."""
        layout = self.layout(projection)
        colours = self.colouring(layout, field_name, clusters)
        total = self.index.count
        which = "every" if layout.count == total else f"a random {layout.count:,} of the"
        caption = (f"{layout.projection} of {which} {total:,} indexed points, coloured by {colours.field}. "
                   "Hover for a point's image, click for its neighbours; Box or Lasso selects (shows the samples).")
        return {"layout": layout_key(layout), "projection": layout.projection, "count": layout.count,
                "colour": field_name, "clusters": int(clusters), "colours": colour_key(layout, colours, int(clusters)),
                "legend": [list(row) for row in colours.legend], "continuous": colours.continuous,
                "caption": caption, "highlight": [], "note": "", "error": ""}

    def point(self, position: int) -> dict:
        """What a hovered point is: id, label, key and a thumbnail (data URL; "" when the shard is unreadable)."""
        layout = self.layout("PCA")  # every projection has the same points in the same order
        if not 0 <= int(position) < layout.count:
            raise MapFieldError(f"no point {position} on the map (it has {layout.count})")
        sample_id = int(layout.ids[int(position)])
        record = self.index.records([sample_id])[0]
        try:
            thumb = thumbnail_data_url(self.collection.thumbs.image(record))
        except (KeyError, OSError, ValueError):
            thumb = ""
        label = str(record.get("label_name") or record.get("caption") or "")
        return {"position": int(position), "id": str(sample_id), "label": label, "key": str(record.get("key") or ""),
                "thumb": thumb}


# -- the tab ----------------------------------------------------------------------------------------

MAP_FRAME = """
<div class="mvm-wrap" data-painted="0">
  <div class="mvm-tools">
    <button type="button" data-mode="pan" class="mvm-on">Pan / zoom</button>
    <button type="button" data-mode="box">Box select</button>
    <button type="button" data-mode="lasso">Lasso select</button>
    <button type="button" data-act="clear">Clear selection</button>
    <button type="button" data-act="reset">Reset view</button>
    <span class="mvm-count"></span>
  </div>
  <div class="mvm-legend"></div>
  <div class="mvm-stage">
    <canvas class="mvm-gl"></canvas>
    <canvas class="mvm-overlay"></canvas>
    <div class="mvm-tip"><img class="mvm-thumb" alt=""><div class="mvm-tip-text"></div></div>
  </div>
  <div class="mvm-caption">Open this tab to draw the map.</div>
</div>
"""

MAP_CSS = """
.mvm-wrap { position: relative; }
.mvm-tools { display: flex; flex-wrap: wrap; gap: 6px; align-items: center; margin-bottom: 4px; font-size: 0.85em; }
.mvm-tools button { border: 1px solid #bbb; border-radius: 4px; padding: 2px 8px; background: #f4f4f4;
  cursor: pointer; }
.mvm-tools button.mvm-on { background: #4c72b0; color: white; border-color: #4c72b0; }
.mvm-count { color: #555; }
.mvm-legend { display: flex; flex-wrap: wrap; gap: 2px 12px; font-size: 0.8em; margin-bottom: 4px; }
.mvm-key i { display: inline-block; width: 10px; height: 10px; border-radius: 5px; margin-right: 4px;
  border: 1px solid #ccc; }
.mvm-stage { position: relative; width: 100%; height: 640px; background: #fafafa; border: 1px solid #ddd;
  border-radius: 6px;
             overflow: hidden; touch-action: none; }
.mvm-stage canvas { position: absolute; left: 0; top: 0; width: 100%; height: 100%; }
.mvm-overlay { pointer-events: none; }
.mvm-tip { position: absolute; display: none; pointer-events: none; background: white; border: 1px solid #888;
  border-radius: 4px;
           padding: 4px; z-index: 10; box-shadow: 0 2px 6px rgba(0,0,0,.25); }
.mvm-thumb { display: block; width: 96px; height: 96px; image-rendering: pixelated; object-fit: contain; }
.mvm-thumb[src=""] { display: none; }
.mvm-tip-text { font-size: 0.8em; max-width: 180px; }
.mvm-caption { font-size: 0.8em; color: #666; }
"""

MAP_SCRIPT = r"""
const wrap = element.querySelector('.mvm-wrap');
const stage = element.querySelector('.mvm-stage');
const canvas = element.querySelector('.mvm-gl');
const overlay = element.querySelector('.mvm-overlay');
const tip = element.querySelector('.mvm-tip');
const captionEl = element.querySelector('.mvm-caption');
const countEl = element.querySelector('.mvm-count');
const legendEl = element.querySelector('.mvm-legend');
const gl = canvas.getContext('webgl2', {antialias: false, preserveDrawingBuffer: true, premultipliedAlpha: false});
const S = {n: 0, layout: null, colours: null, extent: [1, 1], xy: null, sel: null, selCount: 0, hasSel: false,
           highlight: [], cx: 0, cy: 0, zoom: 1, mode: 'pan', grid: null, busy: Promise.resolve(), tips: new Map(),
           seq: 0, firstPaint: null};
if (!gl) { captionEl.textContent = 'This browser has no WebGL2: the map cannot be drawn.'; return; }

function shader(type, source) {
  const s = gl.createShader(type); gl.shaderSource(s, source); gl.compileShader(s);
  if (!gl.getShaderParameter(s, gl.COMPILE_STATUS)) throw new Error(gl.getShaderInfoLog(s));
  return s;
}
const program = gl.createProgram();
gl.attachShader(program, shader(gl.VERTEX_SHADER, `#version 300 es
in vec2 a_pos; in float a_code; in float a_sel;
uniform vec2 u_scale; uniform vec2 u_offset; uniform float u_size; uniform float u_hasSel; uniform float u_ring;
uniform sampler2D u_palette;
out vec4 v_col; out float v_ring;
void main() {
  gl_Position = vec4(a_pos * u_scale + u_offset, 0.0, 1.0);
  gl_PointSize = u_size;
  vec4 c = texelFetch(u_palette, ivec2(int(a_code), 0), 0);
  float fade = (u_hasSel > 0.5 && a_sel < 0.5) ? 0.12 : 0.85;
  v_col = vec4(c.rgb, u_ring > 0.5 ? 1.0 : fade);
  v_ring = u_ring;
}`));
gl.attachShader(program, shader(gl.FRAGMENT_SHADER, `#version 300 es
precision mediump float;
in vec4 v_col; in float v_ring; out vec4 o;
void main() {
  vec2 d = gl_PointCoord * 2.0 - 1.0; float r = dot(d, d);
  if (r > 1.0) discard;
  if (v_ring > 0.5 && r > 0.5) { o = vec4(0.0, 0.0, 0.0, 1.0); return; }
  o = v_col;
}`));
gl.linkProgram(program);
if (!gl.getProgramParameter(program, gl.LINK_STATUS)) throw new Error(gl.getProgramInfoLog(program));
const loc = {pos: gl.getAttribLocation(program, 'a_pos'), code: gl.getAttribLocation(program, 'a_code'),
             sel: gl.getAttribLocation(program, 'a_sel')};
const uni = {};
for (const name of ['u_scale', 'u_offset', 'u_size', 'u_hasSel', 'u_ring',
  'u_palette']) uni[name] = gl.getUniformLocation(program, name);
const buf = {pos: gl.createBuffer(), code: gl.createBuffer(), sel: gl.createBuffer(), hpos: gl.createBuffer()};
const palette = gl.createTexture();
gl.bindTexture(gl.TEXTURE_2D, palette);
gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_MIN_FILTER, gl.NEAREST);
gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_MAG_FILTER, gl.NEAREST);
gl.texImage2D(gl.TEXTURE_2D, 0, gl.RGBA, 256, 1, 0, gl.RGBA, gl.UNSIGNED_BYTE, new Uint8Array(1024).fill(128));

function bytes(b64) { const s = atob(b64); const out = new Uint8Array(s.length); for (let i = 0; i < s.length;
  i++) out[i] = s.charCodeAt(i); return out; }
function hexRGB(h) { return [parseInt(h.slice(1, 3), 16), parseInt(h.slice(3, 5), 16), parseInt(h.slice(5, 7), 16)]; }

function size() {
  const dpr = window.devicePixelRatio || 1, w = stage.clientWidth, h = stage.clientHeight;
  for (const c of [canvas, overlay]) { if (c.width !== Math.round(w * dpr) ||
    c.height !== Math.round(h * dpr)) { c.width = Math.round(w * dpr); c.height = Math.round(h * dpr); } }
  return {w, h, dpr};
}
function pxPerUnit(w, h) { return Math.min(w / S.extent[0], h / S.extent[1]) * 0.94 * S.zoom; }
function toScreen(qx, qy) { const {w, h} = {w: stage.clientWidth, h: stage.clientHeight}; const s = pxPerUnit(w, h);
  return [w / 2 + (qx - S.cx) * s, h / 2 - (qy - S.cy) * s]; }
function toData(x, y) { const w = stage.clientWidth, h = stage.clientHeight; const s = pxPerUnit(w, h);
  return [S.cx + (x - w / 2) / s, S.cy - (y - h / 2) / s]; }
function pointSize() { const base = S.n <= 10000 ? 6 : S.n <= 100000 ? 4 : 2.5; return Math.min(14,
  base * Math.sqrt(S.zoom)); }

function draw() {
  const {w, h, dpr} = size();
  gl.viewport(0, 0, canvas.width, canvas.height);
  gl.clearColor(0.98, 0.98, 0.98, 1); gl.clear(gl.COLOR_BUFFER_BIT);
  if (!S.n || !S.colours) return;  // nothing until both the points and their colours are here
  gl.enable(gl.BLEND); gl.blendFunc(gl.SRC_ALPHA, gl.ONE_MINUS_SRC_ALPHA);
  gl.useProgram(program);
  const s = pxPerUnit(w, h);
  gl.uniform2f(uni.u_scale, 2 * s / w, 2 * s / h);
  gl.uniform2f(uni.u_offset, -2 * s / w * S.cx, -2 * s / h * S.cy);
  gl.uniform1f(uni.u_size, pointSize() * dpr);
  gl.uniform1f(uni.u_hasSel, S.hasSel ? 1 : 0);
  gl.uniform1f(uni.u_ring, 0);
  gl.activeTexture(gl.TEXTURE0); gl.bindTexture(gl.TEXTURE_2D, palette); gl.uniform1i(uni.u_palette, 0);
  gl.bindBuffer(gl.ARRAY_BUFFER, buf.pos); gl.enableVertexAttribArray(loc.pos); gl.vertexAttribPointer(loc.pos, 2,
    gl.UNSIGNED_SHORT, false, 0, 0);
  gl.bindBuffer(gl.ARRAY_BUFFER, buf.code); gl.enableVertexAttribArray(loc.code); gl.vertexAttribPointer(loc.code,
    1, gl.UNSIGNED_BYTE, false, 0, 0);
  gl.bindBuffer(gl.ARRAY_BUFFER, buf.sel); gl.enableVertexAttribArray(loc.sel); gl.vertexAttribPointer(loc.sel, 1,
    gl.UNSIGNED_BYTE, false, 0, 0);
  gl.drawArrays(gl.POINTS, 0, S.n);
  if (S.highlight.length) {
    gl.uniform1f(uni.u_ring, 1);
    gl.uniform1f(uni.u_size, Math.max(11, pointSize() * 2.2) * dpr);
    gl.bindBuffer(gl.ARRAY_BUFFER, buf.hpos); gl.vertexAttribPointer(loc.pos, 2, gl.UNSIGNED_SHORT, false, 0, 0);
    gl.disableVertexAttribArray(loc.code); gl.vertexAttrib1f(loc.code, 255);
    gl.disableVertexAttribArray(loc.sel); gl.vertexAttrib1f(loc.sel, 1);
    gl.drawArrays(gl.POINTS, 0, S.highlight.length);
  }
  const probe = new Uint8Array(4); gl.readPixels(0, 0, 1, 1, gl.RGBA, gl.UNSIGNED_BYTE, probe);  // waits for the GPU
  wrap.dataset.painted = String(S.n);
  wrap.dataset.highlighted = String(S.highlight.length);
  if (S.firstPaint === null) { S.firstPaint = performance.now(); wrap.dataset.firstPaint = String(S.firstPaint); }
}
let queued = false;
function redraw() { if (!queued) { queued = true; requestAnimationFrame(() => { queued = false; draw(); }); } }

function buildGrid() {  // counting sort of the points into 256 x 256 cells, for hover and click look-ups
  const G = 256, cell = 256, counts = new Uint32Array(G * G + 1), xy = S.xy;
  for (let i = 0; i < S.n; i++) counts[((xy[2 * i + 1] >> 8) * G + (xy[2 * i] >> 8)) + 1]++;
  for (let c = 1; c <= G * G; c++) counts[c] += counts[c - 1];
  const fill = counts.slice(0, G * G), items = new Uint32Array(S.n);
  for (let i = 0; i < S.n; i++) items[fill[(xy[2 * i + 1] >> 8) * G + (xy[2 * i] >> 8)]++] = i;
  S.grid = {G, cell, start: counts, items};
}
function nearest(x, y, radiusPx) {
  if (!S.grid || !S.n) return -1;
  const [qx, qy] = toData(x, y), r = radiusPx / pxPerUnit(stage.clientWidth, stage.clientHeight), g = S.grid, xy = S.xy;
  const c0 = Math.max(0, Math.floor((qx - r) / g.cell)), c1 = Math.min(g.G - 1, Math.floor((qx + r) / g.cell));
  const r0 = Math.max(0, Math.floor((qy - r) / g.cell)), r1 = Math.min(g.G - 1, Math.floor((qy + r) / g.cell));
  let best = -1, bestD = r * r;
  for (let row = r0; row <= r1; row++) for (let col = c0; col <= c1; col++) {
    const cellNo = row * g.G + col;
    for (let k = g.start[cellNo]; k < g.start[cellNo + 1]; k++) {
      const i = g.items[k], dx = xy[2 * i] - qx, dy = xy[2 * i + 1] - qy, d = dx * dx + dy * dy;
      if (d <= bestD) { bestD = d; best = i; }
    }
  }
  return best;
}

function renderLegend(v) {
  legendEl.textContent = '';
  for (const [name, colour, count] of (v.legend || [])) {
    const key = document.createElement('span'); key.className = 'mvm-key';
    const dot = document.createElement('i'); dot.style.background = colour; key.appendChild(dot);
    key.appendChild(document.createTextNode(count &&
      !v.continuous ? `${name} (${count.toLocaleString('en-US')})` : name));
    legendEl.appendChild(key);
  }
}
function setSelection(mask, count) {
  S.sel = mask; S.selCount = count; S.hasSel = count > 0 || mask !== null;
  gl.bindBuffer(gl.ARRAY_BUFFER, buf.sel); gl.bufferData(gl.ARRAY_BUFFER, mask || new Uint8Array(S.n), gl.DYNAMIC_DRAW);
  if (mask === null) S.hasSel = false;
  wrap.dataset.selected = String(count);
  countEl.textContent = mask === null ? '' : `${count.toLocaleString('en-US')} selected`;
  redraw();
}
function setHighlight(positions) {
  S.highlight = (positions || []).filter(p => p >= 0 && p < S.n);
  const data = new Uint16Array(2 * S.highlight.length);
  S.highlight.forEach((p, k) => { data[2 * k] = S.xy[2 * p]; data[2 * k + 1] = S.xy[2 * p + 1]; });
  gl.bindBuffer(gl.ARRAY_BUFFER, buf.hpos); gl.bufferData(gl.ARRAY_BUFFER, data, gl.DYNAMIC_DRAW);
}

async function sync() {
  const v = props.value, seq = ++S.seq;
  if (!v || typeof v !== 'object') return;
  if (v.error) { captionEl.textContent = v.error; wrap.dataset.error = v.error; return; }
  delete wrap.dataset.error;
  if (v.layout !== S.layout) {
    const d = await server.map_points({projection: v.projection});
    if (seq !== S.seq) return;
    const raw = bytes(d.xy);
    S.xy = new Uint16Array(raw.buffer, 0, 2 * d.count); S.n = d.count; S.extent = d.extent;
    S.cx = d.extent[0] / 2; S.cy = d.extent[1] / 2; S.zoom = 1; S.layout = d.key; S.colours = null; S.tips.clear();
    gl.bindBuffer(gl.ARRAY_BUFFER, buf.pos); gl.bufferData(gl.ARRAY_BUFFER, S.xy, gl.STATIC_DRAW);
    gl.bindBuffer(gl.ARRAY_BUFFER, buf.code); gl.bufferData(gl.ARRAY_BUFFER, new Uint8Array(S.n), gl.STATIC_DRAW);
    setSelection(null, 0);
    buildGrid();
  }
  if (v.colours !== S.colours) {
    const c = await server.map_colours({projection: v.projection, colour: v.colour, clusters: v.clusters});
    if (seq !== S.seq) return;
    gl.bindBuffer(gl.ARRAY_BUFFER, buf.code); gl.bufferData(gl.ARRAY_BUFFER, bytes(c.codes), gl.STATIC_DRAW);
    const rgba = new Uint8Array(1024);
    c.palette.forEach((h, k) => { const [r, g, b] = hexRGB(h); rgba.set([r, g, b, 255], 4 * k); });
    gl.bindTexture(gl.TEXTURE_2D, palette);
    gl.texImage2D(gl.TEXTURE_2D, 0, gl.RGBA, 256, 1, 0, gl.RGBA, gl.UNSIGNED_BYTE, rgba);
    S.colours = c.key;
  }
  renderLegend(v);
  captionEl.textContent = v.caption + (v.note ? ' ' + v.note : '');
  setHighlight(v.highlight);
  wrap.dataset.layout = S.layout; wrap.dataset.colours = S.colours || '';
  draw();
}
function schedule() {
  S.busy = S.busy.then(sync).catch(e => {
    captionEl.textContent = 'The map could not be drawn: ' + e; wrap.dataset.error = String(e);
  });
}
watch('value', schedule);
schedule();
new ResizeObserver(() => redraw()).observe(stage);

// -- interaction: modes, pan/zoom, box and lasso, hover, click
element.querySelectorAll('.mvm-tools button[data-mode]').forEach(b => b.addEventListener('click', () => {
  S.mode = b.dataset.mode;
    element.querySelectorAll('.mvm-tools button[data-mode]').forEach(o => o.classList.toggle('mvm-on', o === b));
}));
element.querySelector('.mvm-tools button[data-act=clear]').addEventListener('click', () => setSelection(null, 0));
element.querySelector('.mvm-tools button[data-act=reset]').addEventListener('click', () => { S.cx = S.extent[0] / 2;
  S.cy = S.extent[1] / 2; S.zoom = 1; redraw(); });
stage.addEventListener('wheel', (event) => {
  event.preventDefault();
  const box = stage.getBoundingClientRect(), x = event.clientX - box.left, y = event.clientY - box.top;
  const [qx, qy] = toData(x, y);
  S.zoom = Math.min(4000, Math.max(0.5, S.zoom * Math.exp(-event.deltaY * 0.0015)));
  const [nx, ny] = toData(x, y); S.cx += qx - nx; S.cy += qy - ny; redraw();
}, {passive: false});

function pointsInside(shape, poly) {  // poly in data units; same rule as Python's selected_positions
  const xy = S.xy, mask = new Uint8Array(S.n);
  let minX = Infinity, minY = Infinity, maxX = -Infinity, maxY = -Infinity, count = 0;
  for (const [x, y] of poly) { minX = Math.min(minX, x); maxX = Math.max(maxX, x); minY = Math.min(minY, y);
    maxY = Math.max(maxY, y); }
  for (let i = 0; i < S.n; i++) {
    const x = xy[2 * i], y = xy[2 * i + 1];
    if (x < minX || x > maxX || y < minY || y > maxY) continue;
    let inside = true;
    if (shape === 'lasso') {
      inside = false;
      for (let a = 0, b = poly.length - 1; a < poly.length; b = a++) {
        const [xa, ya] = poly[a], [xb, yb] = poly[b];
        if ((ya > y) !== (yb > y) && x < (xb - xa) * (y - ya) / (yb - ya) + xa) inside = !inside;
      }
    }
    if (inside) { mask[i] = 1; count++; }
  }
  return [mask, count];
}
let drag = null;
function local(event) { const box = stage.getBoundingClientRect(); return [event.clientX - box.left,
  event.clientY - box.top]; }
function drawOverlay() {
  const ctx = overlay.getContext('2d'), dpr = window.devicePixelRatio || 1;
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0); ctx.clearRect(0, 0, overlay.width, overlay.height);
  if (!drag || drag.mode === 'pan') return;
  ctx.strokeStyle = '#222'; ctx.setLineDash([5, 4]); ctx.fillStyle = 'rgba(76,114,176,0.12)'; ctx.beginPath();
  if (drag.mode === 'box') { const [x0, y0] = drag.path[0], [x1, y1] = drag.path[drag.path.length - 1]; ctx.rect(x0,
    y0, x1 - x0, y1 - y0); }
  else { drag.path.forEach(([x, y], k) => k ? ctx.lineTo(x, y) : ctx.moveTo(x, y)); ctx.closePath(); }
  ctx.fill(); ctx.stroke();
}
stage.addEventListener('pointerdown', (event) => {
  if (event.button !== 0) return;
  stage.setPointerCapture(event.pointerId);
  const p = local(event); drag = {mode: S.mode, path: [p], start: p, cx: S.cx, cy: S.cy, moved: false};
  tip.style.display = 'none';
});
stage.addEventListener('pointermove', (event) => {
  const p = local(event);
  if (drag) {
    if (Math.hypot(p[0] - drag.start[0], p[1] - drag.start[1]) > 3) drag.moved = true;
    if (drag.mode === 'pan') {
      const s = pxPerUnit(stage.clientWidth, stage.clientHeight);
      S.cx = drag.cx - (p[0] - drag.start[0]) / s; S.cy = drag.cy + (p[1] - drag.start[1]) / s; redraw();
    } else { drag.path.push(p); drawOverlay(); }
    return;
  }
  hover(p);
});
stage.addEventListener('pointerup', (event) => {
  if (!drag) return;
  const d = drag; drag = null; drawOverlay();
  if (!d.moved) { const i = nearest(d.start[0], d.start[1], 8); if (i >= 0) trigger('pick', {position: i}); return; }
  if (d.mode === 'pan') return;
  const path = d.mode === 'box' ? [d.path[0], d.path[d.path.length - 1]] : d.path;
  if (d.mode === 'lasso' && path.length < 3) return;
  const poly = path.map(([x, y]) => toData(x, y));
  const [mask, count] = pointsInside(d.mode, poly);
  setSelection(mask, count);
  trigger('selection', {shape: d.mode, polygon: poly, count: count});
});
stage.addEventListener('pointerleave', () => { tip.style.display = 'none'; });
let hoverTimer = null;
function hover(p) {
  const i = nearest(p[0], p[1], 8);
  if (i < 0) { tip.style.display = 'none'; return; }
  tip.style.left = Math.min(p[0] + 14, stage.clientWidth - 200) + 'px'; tip.style.top = Math.min(p[1] + 14,
    stage.clientHeight - 130) + 'px';
  tip.style.display = 'block'; tip.dataset.position = String(i);
  const known = S.tips.get(i);
  const show = (info) => { if (tip.dataset.position !== String(i)) return;
    tip.querySelector('.mvm-tip-text').textContent = `#${info.id} · ${info.label || info.key}`;
    tip.querySelector('.mvm-thumb').src = info.thumb || ''; };
  if (known) { show(known); return; }
  tip.querySelector('.mvm-tip-text').textContent = `point ${i.toLocaleString('en-US')} …`;
  tip.querySelector('.mvm-thumb').src = '';
  clearTimeout(hoverTimer);
  hoverTimer = setTimeout(() => server.map_point({position: i}).then(info => {
    if (S.tips.size > 2000) S.tips.clear();
    S.tips.set(i, info); show(info);
  }).catch(() => {}), 60);
}
wrap.mvMap = {
  screenOf: (i) => { const box = stage.getBoundingClientRect(); const [x, y] = toScreen(S.xy[2 * i],
    S.xy[2 * i + 1]); return [box.left + x, box.top + y]; },
  pixelAt: (clientX, clientY) => { const box = stage.getBoundingClientRect(), dpr = window.devicePixelRatio || 1;
    const out = new Uint8Array(4); gl.readPixels(Math.round((clientX - box.left) * dpr),
      Math.round(canvas.height - (clientY - box.top) * dpr), 1, 1, gl.RGBA, gl.UNSIGNED_BYTE, out);
      return Array.from(out); },
  state: () => ({n: S.n, highlight: S.highlight.slice(), selected: S.selCount, layout: S.layout, colours: S.colours,
    firstPaint: S.firstPaint}),
};
"""


def build_map_tab(collection: Any, tab: Any) -> None:
    """The tab's components and events (call inside ``gr.Tab``; ``tab`` draws the map when first opened)."""
    import gradio as gr

    from app.search import K_DEFAULT, K_MAX, K_MIN, md_escape, neighbours_for_id, neighbours_for_text, run_search, short
    from app.thumbnails import thumbnail

    model = MapModel(collection)
    encoder, index, thumbs = collection.encoder, collection.index, collection.thumbs

    # server functions: plain HTTP calls from the browser (not queued events), answering JSON
    def map_points(request: dict) -> dict:
        return points_payload(model.layout(str((request or {}).get("projection") or "PCA")))

    def map_colours(request: dict) -> dict:
        request = request or {}
        layout = model.layout(str(request.get("projection") or "PCA"))
        clusters = int(request.get("clusters") or DEFAULT_CLUSTERS)
        colours = model.colouring(layout, str(request.get("colour") or "label"), clusters)
        return colours_payload(layout, colours, clusters)

    def map_point(request: dict) -> dict:
        return model.point(int((request or {}).get("position", -1)))

    projections = ["PCA", "UMAP"] if umap_available() else ["PCA"]
    with gr.Row():
        projection = gr.Radio(projections, value="PCA", elem_id="mv-map-projection",
                              label="Projection" + ("" if umap_available() else " (pip install umap-learn for UMAP)"))
        colour = gr.Dropdown(BASE_FIELDS, value="label", label="Colour by", elem_id="mv-map-colour")
        clusters = gr.Slider(2, 64, value=DEFAULT_CLUSTERS, step=1, label="clusters (k-means)",
                             elem_id="mv-map-clusters")
        k_slider = gr.Slider(K_MIN, K_MAX, value=K_DEFAULT, step=1, label="neighbours to highlight", elem_id="mv-map-k")
    with gr.Row():
        query = gr.Textbox(label="Highlight a search on the map", elem_id="mv-map-query", scale=4,
                           placeholder="a photo of a ship   (or #123 for a sample's neighbours)")
        search_button = gr.Button("Highlight", elem_id="mv-map-search", scale=1)
    with gr.Row():
        with gr.Column(scale=3):
            scatter = gr.HTML(None, html_template=MAP_FRAME, css_template=MAP_CSS, js_on_load=MAP_SCRIPT,
                              elem_id="mv-map", apply_default_css=False,
                              server_functions=[map_points, map_colours, map_point])
        with gr.Column(scale=2):
            status = gr.Markdown("Hover a point to see its image; click it for its neighbours; "
                                 "Box or Lasso selects samples.", elem_id="mv-map-status")
            gallery = gr.Gallery(label="Selected samples / neighbours", columns=4, height="auto", object_fit="contain",
                                 allow_preview=False, format="png", elem_id="mv-map-gallery")
            selected_file = gr.File(label="Selected ids (CSV)", elem_id="mv-map-selected")
    selected_ids = gr.State(np.zeros(0, dtype=np.int64))

    def draw(projection_name: str, field_name: str, cluster_count: float) -> dict:
        try:
            return model.state(projection_name, field_name, int(cluster_count))
        except Exception as error:  # noqa: BLE001 - e.g. an unreadable index or curation table: say so in the tab
            return {"error": f"The map cannot be drawn: {type(error).__name__}: {error}"}

    def open_tab(projection_name: str, field_name: str, cluster_count: float):
        return draw(projection_name, field_name, cluster_count), gr.update(choices=colour_fields(index))

    def highlight(state: Any, ids: Sequence[int], note: str) -> Any:
        if not isinstance(state, dict) or state.get("error") or "layout" not in state:
            return gr.skip()
        layout = model.layout(str(state.get("projection") or "PCA"))
        positions = layout.positions_of(np.asarray(list(ids), dtype=np.int64))
        return {**state, "highlight": [int(p) for p in positions], "note": note}

    def on_query(text: str, k: float, state: Any):
        text = (text or "").strip()
        match = re.fullmatch(r"#\s*(-?\d+)", text)
        if match:
            sample_id = int(match.group(1))
            items, ids, line = run_search(lambda: neighbours_for_id(encoder, index, sample_id, int(k), thumbs=thumbs),
                                          f"sample #{sample_id}")
        else:
            items, ids, line = run_search(lambda: neighbours_for_text(encoder, index, text, int(k), thumbs=thumbs),
                                          f"'{short(text)}'")
        note = f"{len(ids)} results highlighted." if ids else ""
        return items, line + (" · highlighted on the map" if ids else ""), highlight(state, ids, note)

    def on_pick(k: float, state: Any, evt: gr.EventData):
        data = getattr(evt, "_data", None) or {}
        try:
            layout = model.layout(str((state or {}).get("projection") or "PCA"))
            sample_id = int(layout.ids[int(data.get("position"))])
        except (TypeError, ValueError, IndexError, AttributeError) as error:
            return gr.skip(), f"⚠️ {md_escape(str(error))}", gr.skip()
        items, ids, line = run_search(lambda: neighbours_for_id(encoder, index, sample_id, int(k), thumbs=thumbs),
                                      f"the map point #{sample_id}")
        return items, line, highlight(state, ids, f"Neighbours of #{sample_id} highlighted.")

    def on_selection(state: Any, evt: gr.EventData):
        data = getattr(evt, "_data", None) or {}
        try:
            layout = model.layout(str((state or {}).get("projection") or "PCA"))
            positions = selected_positions(layout, str(data.get("shape")), data.get("polygon") or [])
        except (MapFieldError, MapDataError, TypeError, ValueError) as error:
            return gr.skip(), f"⚠️ {md_escape(str(error))}", gr.skip(), gr.skip()
        ids = layout.ids[positions]
        if not len(ids):
            return [], "No points in the selection.", ids, None
        shown = np.sort(np.random.default_rng(0).choice(len(ids), size=min(len(ids), GALLERY_LIMIT), replace=False))
        records = index.records(ids[shown])
        try:
            images = thumbs.images(records)
        except (KeyError, OSError, ValueError) as error:
            line = f"⚠️ {len(ids):,} points selected, but their images cannot be read: {md_escape(str(error))}"
            return [], line, ids, ids_csv(ids)
        items = [(thumbnail(image), f"#{record['id']} · {record.get('label_name') or record.get('key')}")
                 for image, record in zip(images, records)]
        more = f"; showing {len(items)} at random" if len(ids) > len(items) else ""
        return items, f"{len(ids):,} points selected ({data.get('shape')}){more}.", ids, ids_csv(ids)

    on_pick.__annotations__["evt"] = gr.EventData
    on_selection.__annotations__["evt"] = gr.EventData
    controls = [projection, colour, clusters]
    private = {"api_visibility": "private"}  # internal handlers: not part of the app's API
    tab.select(open_tab, controls, [scatter, colour], **private)
    for control in controls:
        control.change(draw, controls, scatter, **private)
    query.submit(on_query, [query, k_slider, scatter], [gallery, status, scatter], **private)
    search_button.click(on_query, [query, k_slider, scatter], [gallery, status, scatter], **private)
    scatter.pick(on_pick, [k_slider, scatter], [gallery, status, scatter], **private)
    scatter.selection(on_selection, [scatter], [gallery, status, selected_ids, selected_file], **private)
