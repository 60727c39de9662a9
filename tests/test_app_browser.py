"""End-to-end test of the search UI in a real browser.

Starts ``python -m app`` on 127.0.0.1 (a free port) in a subprocess on a tiny ONNX encoder + FAISS index,
then drives it with Playwright and Debian's chromium: a text query, an image upload, a click on a result
("more like this"), the query history, a broken upload, the map (hover, click -> neighbours), the
diagnostics and the side-by-side comparison. Skips with a reason when playwright or /usr/bin/chromium
(override with MANYVIEW_CHROMIUM) is absent.
Everything is bounded by timeouts and the server is always stopped.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

try:  # pytest's default "prepend" import mode puts tests/ itself on sys.path
    from onnx_fixtures import shared_onnx_dir
    from server_helpers import free_port, stop_process, wait_until_serving
    from test_app import make_collection
except ImportError:  # e.g. --import-mode=importlib, or tests/ made a package
    from tests.onnx_fixtures import shared_onnx_dir
    from tests.server_helpers import free_port, stop_process, wait_until_serving
    from tests.test_app import make_collection

CHROMIUM = os.environ.get("MANYVIEW_CHROMIUM", "/usr/bin/chromium")  # override for other machines
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
REPO = Path(__file__).resolve().parents[1]
SERVER_START_TIMEOUT_S = 60.0
UI_TIMEOUT_MS = 20_000

pytestmark = [pytest.mark.slow, pytest.mark.timeout(110)]


def _require_browser() -> Any:
    """The playwright sync API, or skip with the reason it cannot run."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium)")
    return sync_api


@pytest.fixture(scope="module")
def sync_api() -> Any:
    return _require_browser()


@pytest.fixture(scope="module")
def server(sync_api: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """``python -m app`` serving a 200-image collection; yields url, index dir and log path."""
    from app.caption_index import build_caption_index
    from index.build import build_index
    from index.search import Index

    onnx_dir, index_dir = make_collection(tmp_path_factory)
    # A second pair for the Compare tab (an image-only encoder over the same shard) and a caption index.
    other_onnx = shared_onnx_dir(tmp_path_factory, with_text=False)
    other_index = tmp_path_factory.mktemp("app-index-b")
    build_index(other_onnx, Index.load(index_dir).info["shards"], other_index, progress=False)
    captions = tmp_path_factory.mktemp("app-captions")
    build_caption_index(str(onnx_dir), str(index_dir), str(captions))
    port = free_port()
    log = tmp_path_factory.mktemp("app-server") / "server.log"
    env = dict(os.environ, PYTHONPATH=str(REPO), GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1",
               GRADIO_TEMP_DIR=str(log.parent / "gradio-cache"), NO_PROXY="127.0.0.1,localhost")
    command = [sys.executable, "-m", "app", "--encoder", str(onnx_dir), "--index", str(index_dir),
               "--host", "127.0.0.1", "--port", str(port), "--text-index", str(captions),
               "--compare-encoder", str(other_onnx), "--compare-index", str(other_index), "--map-points", "150"]
    with open(log, "wb") as log_handle:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log_handle, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until_serving(url, process, log, SERVER_START_TIMEOUT_S)
        yield {"url": url, "index_dir": index_dir, "log": log}
    finally:
        stop_process(process)


@pytest.fixture(scope="module")
def browser(sync_api: Any) -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture()
def page(browser: Any, server: dict) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(UI_TIMEOUT_MS)
    tab.goto(server["url"], wait_until="domcontentloaded", timeout=30_000)
    tab.wait_for_selector("#mv-upload input[type=file]", state="attached")
    try:
        yield tab
    finally:
        context.close()


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------


def _status(page: Any) -> str:
    return page.inner_text("#mv-status").strip()


def _wait_status(page: Any, needle: str, previous: str | None = None) -> str:
    """Wait until the status line contains ``needle`` (and differs from ``previous``); return it."""
    page.wait_for_function(
        "([needle, previous]) => { const el = document.querySelector('#mv-status');"
        " const text = el ? el.innerText.trim() : ''; return text.includes(needle) && text !== previous; }",
        arg=[needle, previous or ""],
    )
    return _status(page)


def _thumbnails(page: Any) -> Any:
    return page.locator("#mv-gallery .thumbnail-item")


def _wait_thumbnails(page: Any, count: int) -> list[str]:
    """Wait until the gallery shows exactly ``count`` thumbnails; return their captions."""
    page.wait_for_function(
        "n => document.querySelectorAll('#mv-gallery .thumbnail-item').length === n", arg=count
    )
    return [text.strip() for text in page.locator("#mv-gallery .thumbnail-item .caption-label").all_inner_texts()]


def _set_k(page: Any, k: int) -> None:
    number = page.locator("#mv-k input[type=number]")
    number.fill(str(k))
    number.press("Enter")
    page.wait_for_function(
        "k => document.querySelector('#mv-k input[type=range]').value === String(k)", arg=k
    )


def _query_image(server: dict, path: Path) -> Path:
    """Save one indexed image (scaled up, as a user's photo would be) to ``path``."""
    from index.search import Index

    index = Index.load(server["index_dir"])
    image = index.image(int(index.ids[5]))
    image.resize((96, 96)).save(path)
    return path


# ---------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------


def test_text_upload_and_more_like_this(page: Any, server: dict, tmp_path: Path) -> None:
    # Text query with the default k = 8.
    page.fill("#mv-query textarea, #mv-query input", "a photo of a ship")
    page.click("#mv-text-search")
    status = _wait_status(page, "results for 'a photo of a ship'")
    assert status.startswith("8 results for 'a photo of a ship' in ") and status.endswith(" ms")
    captions = _wait_thumbnails(page, 8)
    assert all(" · score " in caption for caption in captions), captions

    # Another k, another query (Enter submits the text box).
    _set_k(page, 5)
    page.fill("#mv-query textarea, #mv-query input", "a photo of a frog")
    page.press("#mv-query textarea, #mv-query input", "Enter")
    status = _wait_status(page, "5 results for 'a photo of a frog'")
    _wait_thumbnails(page, 5)

    # Upload an image: the upload itself runs the search.
    _set_k(page, 6)
    page.set_input_files("#mv-upload input[type=file]", str(_query_image(server, tmp_path / "query.png")))
    status = _wait_status(page, "6 results for the uploaded image")
    upload_captions = _wait_thumbnails(page, 6)
    assert upload_captions[0].endswith("score 1.000") or upload_captions[0].endswith("score 0.999"), upload_captions

    # The button searches again with the same image (at another k: the same k could give the very same status line,
    # latency included, and nothing to wait for).
    _set_k(page, 7)
    page.click("#mv-image-search")
    status = _wait_status(page, "7 results for the uploaded image", previous=status)
    assert _wait_thumbnails(page, 7)[:6] == upload_captions

    # Click the third result: "more like this" searches by that image, which then comes first.
    _thumbnails(page).nth(2).click()
    status = _wait_status(page, "7 results for the clicked ")
    captions = _wait_thumbnails(page, 7)
    assert captions[0].endswith("score 1.000") or captions[0].endswith("score 0.999"), captions
    assert captions[:6] != upload_captions  # another query image, other neighbours

    page.wait_for_timeout(300)  # let the thumbnails paint before the screenshot
    shot = tmp_path / "app.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def test_broken_upload_gives_a_message_and_the_app_keeps_serving(page: Any, tmp_path: Path) -> None:
    broken = tmp_path / "holiday.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"this is not really a png" * 20)
    page.set_input_files("#mv-upload input[type=file]", str(broken))
    status = _wait_status(page, "Could not read")
    assert "holiday.png" in status and "Upload a JPEG, PNG or WebP picture" in status, status

    text = tmp_path / "notes.txt"
    text.write_text("just some words")
    page.set_input_files("#mv-upload input[type=file]", str(text))
    page.get_by_text("Invalid file type").first.wait_for(state="visible")  # rejected by the browser side

    page.fill("#mv-query textarea, #mv-query input", "a photo of a truck")
    page.click("#mv-text-search")
    _wait_status(page, "8 results for 'a photo of a truck'")
    _wait_thumbnails(page, 8)
    page.screenshot(path=str(tmp_path / "after-broken-upload.png"), full_page=True)


def _open_tab(page: Any, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def test_history_and_caption_index(page: Any) -> None:
    page.fill("#mv-query textarea, #mv-query input", "a photo of a ship")
    page.click("#mv-text-search")
    _wait_status(page, "8 results for 'a photo of a ship'")
    page.fill("#mv-query textarea, #mv-query input", "a photo of a frog")
    page.click("#mv-text-search")
    status = _wait_status(page, "8 results for 'a photo of a frog'")
    # Pick the first query from the history: it runs again.
    page.click("#mv-history input")
    page.get_by_role("option", name="text: a photo of a ship").click()
    _wait_status(page, "8 results for 'a photo of a ship'", previous=status)
    # Search the captions instead of the images: the caption text finds its own sample at score 1.
    page.get_by_label("captions").check()
    page.click("#mv-text-search")
    _wait_status(page, "8 results for 'a photo of a frog' in the captions")
    _wait_thumbnails(page, 8)


def test_map_renders_and_a_click_opens_neighbours(page: Any) -> None:
    _open_tab(page, "Map")
    page.wait_for_function("() => document.querySelector('#mv-map .mvm-wrap')?.dataset.painted === '200'")  # all
    legend = page.inner_text("#mv-map .mvm-legend")
    assert "airplane" in legend or "red" in legend, legend  # CIFAR classes, or the generated shard's
    x, y = page.evaluate("() => document.querySelector('#mv-map .mvm-wrap').mvMap.screenOf(3)")
    page.mouse.move(x, y)
    page.wait_for_function("() => document.querySelector('#mv-map .mvm-tip-text').innerText.startsWith('#')")
    sample_id = page.inner_text("#mv-map .mvm-tip-text").split(" · ")[0]
    page.mouse.click(x, y)
    page.wait_for_function("() => document.querySelector('#mv-map-status').innerText.includes('8 results for the map point')")
    status = page.inner_text("#mv-map-status")
    assert sample_id in status, (sample_id, status)
    page.wait_for_function("() => document.querySelectorAll('#mv-map-gallery .thumbnail-item').length === 8")
    first = page.locator("#mv-map-gallery .thumbnail-item .caption-label").first.inner_text()
    assert first.endswith("score 1.000") or first.endswith("score 0.999"), first
    page.wait_for_function("() => document.querySelector('#mv-map .mvm-wrap').dataset.highlighted === '8'")
    # Colour by k-means cluster: the legend switches to clusters.
    page.locator("#mv-map-colour input").click()
    page.get_by_role("option", name="k-means cluster").click()
    page.wait_for_function("() => document.querySelector('#mv-map .mvm-legend').innerText.includes('cluster 0')")


def test_diagnostics_and_compare(page: Any, server: dict, tmp_path: Path) -> None:
    _open_tab(page, "Diagnostics")
    page.wait_for_selector("#mv-diag-table table", timeout=60_000)
    table = page.inner_text("#mv-diag-table")
    for figure in ("alignment", "uniformity", "kNN top-1", "zero-shot top-1", "recall@10"):
        assert figure in table, table
    page.wait_for_selector("#mv-diag-norms img")
    assert "fixture" in page.inner_text("#mv-diag-card")

    _open_tab(page, "Compare")
    page.fill("#mv-cmp-query textarea", "a photo of a ship")
    page.click("#mv-cmp-text-search")
    page.wait_for_function("() => document.querySelector('#mv-cmp-status-a').innerText.includes('8 results')")
    page.wait_for_function("() => document.querySelector('#mv-cmp-status-b').innerText.includes('no text tower')")
    # An image query runs on both sides; the same collection means overlapping results.
    page.set_input_files("#mv-cmp-upload input[type=file]", str(_query_image(server, tmp_path / "query.png")))
    page.wait_for_function("() => document.querySelector('#mv-cmp-status-b').innerText.includes('8 results for the uploaded image')")
    page.wait_for_function("() => document.querySelectorAll('#mv-cmp-gallery-b .thumbnail-item').length === 8")
    assert "results in common" in page.inner_text("#mv-cmp-overlap")
