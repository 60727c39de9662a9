"""The Map tab at scale: projection cache, colour fields, selection, and a 60,000-point WebGL map in Chromium.

Unit tests use small synthetic Flat indexes (``map_fixtures``: clustered vectors, ids that differ from rows,
train/test shards). The browser tests start ``python -m app`` on a 60,000-point synthetic index and drive
it with Playwright and Debian's chromium (software WebGL2): the map draws every point, a box and a lasso
selection open a gallery of exactly the points inside (checked against the coordinates cached beside the
index), and a text search highlights its results (checked against the same search run here).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

try:  # pytest's default "prepend" import mode puts tests/ itself on sys.path
    from map_fixtures import ID_BASE, clustered_vectors, make_map_index, make_map_shards
    from onnx_fixtures import shared_onnx_dir
    from server_helpers import free_port, stop_process, wait_until_serving
except ImportError:  # tests/ imported as a package
    from tests.map_fixtures import ID_BASE, clustered_vectors, make_map_index, make_map_shards
    from tests.onnx_fixtures import shared_onnx_dir
    from tests.server_helpers import free_port, stop_process, wait_until_serving

from app import projection
from app.map_tab import (
    HIGHLIGHT_COLOUR, MISSING_COLOUR, PALETTE, MapFieldError, MapModel, categorical_codes, colour_fields, colouring,
    continuous, selected_positions, split_name,
)
from app.projection import MapDataError, MapLayout, cache_dir, cluster_labels, index_fingerprint, map_layout

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("MANYVIEW_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
BROWSER_POINTS = 60_000


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list:
    return make_map_shards(tmp_path_factory.mktemp("map-data"), per_shard=20)


def _index(directory: Path, shards: list, count: int, seed: int = 0) -> Any:
    from index.search import Index

    make_map_index(directory, shards, count, dim=16, seed=seed)
    return Index.load(directory)


# ---------------------------------------------------------------------------------------------------
# projection and its cache
# ---------------------------------------------------------------------------------------------------


def test_pca_matches_numpy_and_is_streamed_in_blocks(tmp_path: Path, shards: list,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(projection, "BLOCK", 97)  # many blocks, the last one partial
    index = _index(tmp_path / "index", shards, 1000)
    layout = map_layout(index, "PCA")
    vectors, _ = clustered_vectors(1000, 16)
    centred = vectors.astype(np.float64) - vectors.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    expected = centred @ vt[:2].T
    assert layout.count == 1000 and np.array_equal(layout.ids, ID_BASE + 3 * np.arange(1000))
    for axis in range(2):  # the same axes up to sign
        assert np.allclose(np.abs(layout.xy[:, axis]), np.abs(expected[:, axis]), atol=1e-4)
    assert layout.quantised.max() == projection.QUANT and layout.quantised.min(axis=0).tolist() == [0, 0]
    wanted = layout.ids[[5, 900, 17]]
    assert layout.positions_of(np.append(wanted, 7)).tolist() == [5, 900, 17]  # id 7 is not on the map


def test_projection_cache_is_reused_and_invalidated_when_the_index_changes(
        tmp_path: Path, shards: list, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_path / "index"
    index = _index(directory, shards, 500)
    first = map_layout(index, "PCA")
    labels = cluster_labels(index, first, 4)
    cached = sorted(path.name for path in cache_dir(index).iterdir())
    assert cached == ["kmeans-4-500-0.npz", "pca-1000000-0.npz"]  # no temporary files left behind

    calls = []
    real = projection.pca_layout
    monkeypatch.setattr(projection, "pca_layout", lambda *a, **k: calls.append(1) or real(*a, **k))
    from index.search import Index

    again = map_layout(Index.load(directory), "PCA")  # a new start: read back, not recomputed
    assert calls == [] and np.array_equal(again.xy, first.xy) and again.fingerprint == first.fingerprint
    assert np.array_equal(cluster_labels(Index.load(directory), again, 4), labels)

    changed = _index(directory, shards, 500, seed=1)  # a rebuilt index: a new generation, other vectors
    assert index_fingerprint(changed) != first.fingerprint
    recomputed = map_layout(changed, "PCA")
    assert calls == [1] and not np.allclose(recomputed.xy, first.xy)
    assert map_layout(changed, "PCA").fingerprint == recomputed.fingerprint and calls == [1]


def test_a_damaged_or_foreign_cache_file_is_recomputed(tmp_path: Path, shards: list) -> None:
    index = _index(tmp_path / "index", shards, 300)
    good = map_layout(index, "PCA")
    path = cache_dir(index) / "pca-1000000-0.npz"
    path.write_bytes(b"not an npz file")
    assert np.allclose(map_layout(index, "PCA").xy, good.xy)
    projection.save_cached(cache_dir(index), "pca-1000000-0", "another-index", good.rows, good.xy * 0 + 5)
    assert np.allclose(map_layout(index, "PCA").xy, good.xy)


def test_limit_draws_a_fixed_random_subset(tmp_path: Path, shards: list) -> None:
    index = _index(tmp_path / "index", shards, 400)
    layout = map_layout(index, "PCA", limit=150)
    assert layout.count == 150 and np.all(np.diff(layout.rows) > 0)
    assert np.array_equal(map_layout(index, "PCA", limit=150).rows, layout.rows)
    with pytest.raises(MapDataError, match="at least 1"):
        map_layout(index, "PCA", limit=0)
    with pytest.raises(MapDataError, match="unknown projection"):
        map_layout(index, "tSNE")


def test_compressed_ivf_vectors_are_decoded_for_the_map(tmp_path: Path) -> None:
    """IVF-SQ8 (as IVF-PQ: codes only, no exact vectors; SQ8 trains in milliseconds where PQ takes seconds)."""
    import faiss

    from index.store import stored_vectors

    vectors, assigned = clustered_vectors(2000, 16, clusters=4)
    ivfpq = faiss.index_factory(16, "IVF8,SQ8", faiss.METRIC_INNER_PRODUCT)
    ivfpq.train(vectors)
    ids = 5 + 7 * np.arange(2000, dtype=np.int64)
    ivfpq.add_with_ids(vectors, ids)
    assert stored_vectors(ivfpq) is None  # the exact vectors are gone

    class Fake:  # just what projection needs of index.search.Index
        faiss_index, dim, count, directory = ivfpq, 16, 2000, tmp_path
        info = {"files": {}}

    Fake.ids = ids
    blocks = projection.vector_blocks(Fake, np.arange(2000))
    decoded = np.zeros((2000, 16), np.float32)
    for positions, block in blocks():
        decoded[positions] = block
    assert np.mean(np.sum(decoded * vectors, axis=1)) > 0.99  # decoded ~ the originals, in the right order
    labels = projection.kmeans_labels(blocks, 2000, 16, 4)
    purity = sum(np.bincount(labels[assigned == c]).max() for c in range(4)) / 2000
    assert purity > 0.95


def test_landmark_layout_places_landmarks_exactly_and_others_near_them(tmp_path: Path, shards: list) -> None:
    index = _index(tmp_path / "index", shards, 600)
    rows = np.arange(600)
    blocks = projection.vector_blocks(index, rows)
    exact = projection.pca_layout(blocks, 600, 16)
    mean, axes = projection.pca_axes(blocks, 16)
    placed = projection.landmark_layout(blocks, 600, 16, lambda x: (x - mean) @ axes.T, landmarks=200)
    chosen = np.sort(np.random.default_rng(0).choice(600, size=200, replace=False))
    assert np.allclose(placed[chosen], exact[chosen], atol=1e-4)
    others = np.setdiff1d(rows, chosen)
    spread = np.abs(exact).max()
    assert np.median(np.linalg.norm(placed[others] - exact[others], axis=1)) < 0.25 * spread


# ---------------------------------------------------------------------------------------------------
# colour fields
# ---------------------------------------------------------------------------------------------------


def test_categorical_and_continuous_codes() -> None:
    colours = categorical_codes("f", np.array([2, 0, 2, -1, 2, 0]), ["a", "b", "c"], "none")
    assert colours.codes.tolist() == [0, 1, 0, len(PALETTE), 0, 1]  # largest first; missing in the grey slot
    assert colours.legend == [("c", PALETTE[0], 3), ("a", PALETTE[1], 2), ("none", MISSING_COLOUR, 1)]
    many = categorical_codes("g", np.arange(40), [f"group {i}" for i in range(40)])
    assert many.codes.max() == len(PALETTE) - 1 and "16 more (colours repeat)" in many.legend[-1][0]
    ramp = continuous("u", [0.0, 0.5, 1.0, np.nan])
    assert ramp.codes.tolist() == [0, 126, 253, 254] and ramp.continuous and ramp.legend[-1][0] == "none"
    assert split_name("/d/train-000001.tar.gz") == "train" and split_name("/d/val/000001.tar") == "val"


def test_colour_by_label_split_shard_cluster_and_metadata(tmp_path: Path, shards: list) -> None:
    index = _index(tmp_path / "index", shards, 1000)
    layout = map_layout(index, "PCA")
    assert colour_fields(index) == ["label", "k-means cluster", "split", "shard"]
    by_label = colouring(index, layout, "label")
    assert {name: count for name, _, count in by_label.legend} == {f"c{i}": 100 for i in range(10)}
    assert len(set(by_label.codes[np.arange(1000) % 10 == 3])) == 1  # one colour per label
    split = colouring(index, layout, "split")
    assert {name: count for name, _, count in split.legend} == {"train": 500, "test": 500}
    assert split.codes[0] != split.codes[1] and split.codes[0] == split.codes[2]  # rows alternate train/test
    assert [name for name, _, _ in colouring(index, layout, "shard").legend] == ["test-000000.tar", "train-000000.tar"]
    clusters = colouring(index, layout, "k-means cluster", 10)
    truth = np.arange(1000) % 10
    purity = sum(np.bincount(clusters.codes[truth == c]).max() for c in range(10)) / 1000
    assert purity > 0.95 and len(clusters.legend) == 10
    with pytest.raises(MapFieldError, match="choose one of label"):
        colouring(index, layout, "nonsense")


def test_colour_by_curation_tables(tmp_path: Path, shards: list) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    index = _index(tmp_path / "index", shards, 300)
    layout = map_layout(index, "PCA")
    curation = tmp_path / "index" / "curation"
    curation.mkdir()
    ids = layout.ids
    pq.write_table(pa.table({"group": [0, 0, 1, 1, 1], "id": ids[[3, 9, 20, 21, 22]], "key": ["k"] * 5,
                             "score": [0.99, 0.98, 0.97, 0.96, 0.95]}), curation / "near_duplicates.parquet")
    pq.write_table(pa.table({"id": ids, "uniqueness": np.linspace(0.0, 1.0, 300)}), curation / "uniqueness.parquet")
    fields = colour_fields(index)
    assert {"duplicate group", "near_duplicates: score", "uniqueness"} <= set(fields)
    groups = colouring(index, layout, "duplicate group")
    assert groups.codes[3] == groups.codes[9] != groups.codes[20] == groups.codes[21] == groups.codes[22]
    assert groups.codes[0] == len(PALETTE) and groups.legend[-1] == ("not in a group", MISSING_COLOUR, 295)
    assert [name for name, _, _ in groups.legend[:2]] == ["group 1", "group 0"]  # largest group first
    unique = colouring(index, layout, "uniqueness")
    assert unique.continuous and unique.codes[0] == 0 and unique.codes[-1] == 253 and np.all(np.diff(unique.codes) >= 0)
    state = MapModel(type("C", (), {"index": index, "seed": 0, "cached": lambda self, k, make: make(),
                                     "map_limit": 1_000_000})()).state("PCA", "uniqueness", 10)
    assert state["count"] == 300 and "coloured by uniqueness" in state["caption"] and state["continuous"]


def test_box_and_lasso_selection() -> None:
    quantised = np.array([[0, 0], [10, 10], [20, 5], [5, 20], [30, 30]], dtype=np.uint16)
    layout = MapLayout("PCA", np.arange(5), np.arange(5) + 100, quantised.astype(np.float32), quantised, "f")
    assert selected_positions(layout, "box", [[25, 25], [1, 1]]).tolist() == [1, 2, 3]
    assert selected_positions(layout, "lasso", [[-1, -1], [40, -1], [-1, 40]]).tolist() == [0, 1, 2, 3]
    assert selected_positions(layout, "lasso", [[-1, -1], [25, -1], [-1, 25]]).tolist() == [0, 1]  # x + y < 24
    with pytest.raises(MapFieldError, match="at least three"):
        selected_positions(layout, "lasso", [[0, 0], [1, 1]])
    with pytest.raises(MapFieldError, match="box or lasso"):
        selected_positions(layout, "circle", [[0, 0], [1, 1]])


# ---------------------------------------------------------------------------------------------------
# in Chromium: a 60,000-point map
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sync_api() -> Any:
    api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium)")
    return api


@pytest.fixture(scope="module")
def map_server(sync_api: Any, shards: list, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """``python -m app`` on a 60,000-point synthetic index; yields url, onnx and index directories."""
    onnx_dir = shared_onnx_dir(tmp_path_factory, with_text=True)
    index_dir = tmp_path_factory.mktemp("map-index-60k")
    make_map_index(index_dir, shards, BROWSER_POINTS, dim=16)
    port = free_port()
    log = tmp_path_factory.mktemp("map-server") / "server.log"
    env = dict(os.environ, PYTHONPATH=str(REPO), GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1",
               GRADIO_TEMP_DIR=str(log.parent / "gradio-cache"), NO_PROXY="127.0.0.1,localhost")
    command = [sys.executable, "-m", "app", "--encoder", str(onnx_dir), "--index", str(index_dir),
               "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as handle:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until_serving(url, process, log, 90.0)
        yield {"url": url, "onnx": onnx_dir, "index": index_dir, "log": log}
    finally:
        stop_process(process)


@pytest.fixture(scope="module")
def map_page(sync_api: Any, map_server: dict) -> Iterator[Any]:
    """One page with the Map tab open and drawn (the tests below share it, in order)."""
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(30_000)
            page.goto(map_server["url"], wait_until="domcontentloaded")
            page.get_by_role("tab", name="Map").click()
            page.wait_for_function("n => document.querySelector('#mv-map .mvm-wrap')?.dataset.painted === n",
                                   arg=str(BROWSER_POINTS))
            yield page
        finally:
            browser.close()


def _wait_text(page: Any, selector: str, needle: str) -> None:
    page.wait_for_function("([s, n]) => (document.querySelector(s)?.innerText || '').includes(n)",
                           arg=[selector, needle])


def _api(page: Any, call: str) -> Any:
    return page.evaluate(f"() => document.querySelector('#mv-map .mvm-wrap').mvMap.{call}")


def _layout(map_server: dict) -> MapLayout:
    from index.search import Index

    return map_layout(Index.load(map_server["index"]), "PCA")  # read back from the server's cache


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_browser_draws_60k_points_with_legend_hover_and_colour_switch(map_page: Any, map_server: dict) -> None:
    assert _api(map_page, "state()")["n"] == BROWSER_POINTS
    assert "every 60,000 indexed points" in map_page.inner_text("#mv-map .mvm-caption")
    assert "c3 (6,000)" in map_page.inner_text("#mv-map .mvm-legend")
    assert (Path(map_server["index"]) / "map" / "pca-1000000-0.npz").is_file()  # cached beside the index
    x, y = _api(map_page, "screenOf(0)")
    pixel = _api(map_page, f"pixelAt({x}, {y})")
    assert pixel[:3] != [250, 250, 250]  # something is drawn where point 0 is
    map_page.mouse.move(x, y)
    map_page.wait_for_function("() => document.querySelector('#mv-map .mvm-tip-text').innerText.startsWith('#')")
    tip = map_page.inner_text("#mv-map .mvm-tip-text")
    layout = _layout(map_server)
    nearest = int(np.argmin(np.linalg.norm(layout.quantised.astype(float) - layout.quantised[0], axis=1)))
    assert tip.startswith(f"#{layout.ids[nearest]} · c"), tip
    map_page.wait_for_function("() => document.querySelector('#mv-map .mvm-thumb').src.startsWith('data:image/png')")
    map_page.locator("#mv-map-colour input").click()
    map_page.get_by_role("option", name="split").click()
    _wait_text(map_page, "#mv-map .mvm-legend", "train (30,000)")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_browser_box_and_lasso_selections_open_a_gallery(map_page: Any, map_server: dict) -> None:
    layout = _layout(map_server)
    stage = map_page.locator("#mv-map .mvm-stage").bounding_box()
    left, top = stage["x"] + stage["width"] * 0.3, stage["y"] + stage["height"] * 0.3
    right, bottom = stage["x"] + stage["width"] * 0.6, stage["y"] + stage["height"] * 0.65

    map_page.click("#mv-map button[data-mode=box]")
    map_page.mouse.move(left, top)
    map_page.mouse.down()
    map_page.mouse.move(right, bottom, steps=6)
    map_page.mouse.up()
    _wait_text(map_page, "#mv-map-status", "points selected (box)")
    inside = _inside_box(map_page, layout, (left, top), (right, bottom))
    status = map_page.inner_text("#mv-map-status")
    assert 0 < inside < BROWSER_POINTS and status.startswith(f"{inside:,} points selected (box)"), (inside, status)
    assert map_page.evaluate("() => document.querySelector('#mv-map .mvm-wrap').dataset.selected") == str(inside)
    map_page.wait_for_function("() => document.querySelectorAll('#mv-map-gallery .thumbnail-item').length === 48")
    captions = map_page.locator("#mv-map-gallery .thumbnail-item .caption-label").all_inner_texts()
    shown = {int(text.split(" · ")[0].lstrip("#")) for text in captions}
    chosen = set(layout.ids[_box_positions(map_page, layout, (left, top), (right, bottom))].tolist())
    assert shown <= chosen and len(shown) == 48

    map_page.click("#mv-map button[data-mode=lasso]")
    path = [(left, bottom), ((left + right) / 2, top), (right, bottom)]
    map_page.mouse.move(*path[0])
    map_page.mouse.down()
    for point in path[1:] + [path[0]]:
        map_page.mouse.move(*point, steps=8)
    map_page.mouse.up()
    _wait_text(map_page, "#mv-map-status", "points selected (lasso)")
    lasso = int(map_page.evaluate("() => document.querySelector('#mv-map .mvm-wrap').dataset.selected"))
    status = map_page.inner_text("#mv-map-status")
    assert 0 < lasso < inside and status.startswith(f"{lasso:,} points selected (lasso)"), (lasso, inside, status)
    map_page.click("#mv-map button[data-act=clear]")
    map_page.click("#mv-map button[data-mode=pan]")


def _box_positions(page: Any, layout: MapLayout, start: tuple, end: tuple) -> np.ndarray:
    """The positions inside the screen box, from the coordinates cached beside the index and the page's view."""
    (ax, ay), (bx, by) = (_screen_to_data(page, layout, *start), _screen_to_data(page, layout, *end))
    low, high = np.minimum([ax, ay], [bx, by]), np.maximum([ax, ay], [bx, by])
    points = layout.quantised.astype(np.float64)
    return np.flatnonzero(np.all((points >= low) & (points <= high), axis=1))


def _inside_box(page: Any, layout: MapLayout, start: tuple, end: tuple) -> int:
    return int(len(_box_positions(page, layout, start, end)))


def _screen_to_data(page: Any, layout: MapLayout, x: float, y: float) -> tuple[float, float]:
    """Invert the page's (linear) view transform from where two far-apart points are drawn."""
    first, second = int(np.argmin(layout.quantised[:, 0])), int(np.argmax(layout.quantised[:, 0]))
    third = int(np.argmax(layout.quantised[:, 1]))
    (x1, y1), (x2, _), (_, y3) = (_api(page, f"screenOf({i})") for i in (first, second, third))
    q = layout.quantised.astype(np.float64)
    scale_x = (x2 - x1) / (q[second, 0] - q[first, 0])
    scale_y = (y3 - y1) / (q[third, 1] - q[first, 1])
    return q[first, 0] + (x - x1) / scale_x, q[first, 1] + (y - y1) / scale_y


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_browser_search_highlights_its_results(map_page: Any, map_server: dict) -> None:
    from export.runtime import Encoder
    from index.search import Index

    from app.search import neighbours_for_text

    index = Index.load(map_server["index"])
    expected = [hit.id for hit in neighbours_for_text(Encoder(map_server["onnx"]), index, "a photo of green", 8)]
    map_page.fill("#mv-map-query textarea", "a photo of green")
    map_page.click("#mv-map-search")
    map_page.wait_for_function("() => document.querySelector('#mv-map .mvm-wrap').dataset.highlighted === '8'")
    assert "8 results for 'a photo of green'" in map_page.inner_text("#mv-map-status")
    layout = _layout(map_server)
    highlighted = _api(map_page, "state()")["highlight"]
    assert sorted(layout.ids[highlighted].tolist()) == sorted(expected)
    red, green, blue = (int(HIGHLIGHT_COLOUR[i:i + 2], 16) for i in (1, 3, 5))
    x, y = _api(map_page, f"screenOf({highlighted[0]})")
    assert _api(map_page, f"pixelAt({x}, {y})")[:3] == [red, green, blue]  # drawn in the highlight colour
