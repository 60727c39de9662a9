"""Screenshots of each tab of the app: docs/screenshots/{search,map,diagnostics,compare}.png.

    python tests/benchmarks/screenshots.py --encoder RUN/onnx --index RUN/index \
        [--compare-encoder B/onnx --compare-index B/index] [--query 'a photo of a ship'] [--output docs/screenshots]

Starts ``python -m app`` on a free local port, drives it with playwright and Debian's chromium
(``MANYVIEW_CHROMIUM`` overrides /usr/bin/chromium), saves one PNG per tab and stops the server.
Also a smoke check of an index: it fails loudly when a tab does not render.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("MANYVIEW_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_app(args: list[str], log: Path, timeout_s: float = 120.0) -> tuple[subprocess.Popen, str]:
    """``python -m app ARGS --port <free>``; returns the process and its URL once it answers."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1",
               NO_PROXY="127.0.0.1,localhost")
    with open(log, "wb") as handle:
        process = subprocess.Popen([sys.executable, "-m", "app", *args, "--port", str(port)], cwd=REPO, env=env,
                                   stdout=handle, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.3)
    process.terminate()
    raise RuntimeError(f"the app did not answer within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_text(page, selector: str, needle: str, timeout_ms: int = 60_000) -> None:
    page.wait_for_function(
        "([s, n]) => { const el = document.querySelector(s); return !!el && el.innerText.includes(n); }",
        arg=[selector, needle], timeout=timeout_ms)


def capture(url: str, output: Path, query: str, compare: bool) -> dict[str, Path]:
    from playwright.sync_api import sync_playwright

    output.mkdir(parents=True, exist_ok=True)
    shots = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
        page.set_default_timeout(60_000)
        page.goto(url, wait_until="domcontentloaded")
        page.wait_for_selector("#mv-upload input[type=file]", state="attached")

        if page.locator("#mv-query textarea").count():
            page.fill("#mv-query textarea", query)
            page.click("#mv-text-search")
        else:
            page.click("#mv-random")
        wait_text(page, "#mv-status", "results for")
        page.wait_for_function("() => document.querySelectorAll('#mv-gallery .thumbnail-item img').length >= 8")
        page.wait_for_timeout(500)
        shots["search"] = output / "search.png"
        page.screenshot(path=str(shots["search"]))

        page.get_by_role("tab", name="Map").click()
        page.wait_for_selector("#mv-map svg.mv-scatter circle", timeout=120_000)
        dot = page.locator("#mv-map circle").nth(7)
        dot.click(force=True)
        wait_text(page, "#mv-map-status", "results for")
        page.wait_for_function("() => document.querySelectorAll('#mv-map-gallery .thumbnail-item img').length >= 4")
        page.locator("#mv-map circle").nth(11).hover(force=True)
        page.wait_for_timeout(500)
        shots["map"] = output / "map.png"
        page.screenshot(path=str(shots["map"]))

        page.get_by_role("tab", name="Diagnostics").click()
        page.wait_for_selector("#mv-diag-table table", timeout=180_000)
        page.wait_for_selector("#mv-diag-norms img", timeout=60_000)
        page.wait_for_timeout(500)
        shots["diagnostics"] = output / "diagnostics.png"
        page.screenshot(path=str(shots["diagnostics"]), full_page=True)

        page.get_by_role("tab", name="Compare").click()
        if compare:
            if page.locator("#mv-cmp-query textarea").count():
                page.fill("#mv-cmp-query textarea", query)
                page.click("#mv-cmp-text-search")
                wait_text(page, "#mv-cmp-status-a", "results for")
                wait_text(page, "#mv-cmp-status-b", "for")
            page.wait_for_timeout(800)
        shots["compare"] = output / "compare.png"
        page.screenshot(path=str(shots["compare"]))
        browser.close()
    return shots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", required=True)
    parser.add_argument("--index", required=True)
    parser.add_argument("--compare-encoder")
    parser.add_argument("--compare-index")
    parser.add_argument("--text-index")
    parser.add_argument("--query", default="a photo of a ship")
    parser.add_argument("--title", default="manyview search")
    parser.add_argument("--output", default=str(REPO / "docs" / "screenshots"))
    args = parser.parse_args(argv)
    app_args = ["--encoder", args.encoder, "--index", args.index, "--title", args.title]
    if args.compare_encoder:
        app_args += ["--compare-encoder", args.compare_encoder, "--compare-index", args.compare_index]
    if args.text_index:
        app_args += ["--text-index", args.text_index]
    with tempfile.TemporaryDirectory(prefix="manyview-shots-") as scratch:
        log = Path(scratch) / "app.log"
        os.environ.setdefault("GRADIO_TEMP_DIR", str(Path(scratch) / "gradio"))
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the server
        process, url = start_app(app_args, log)
        try:
            shots = capture(url, Path(args.output), args.query, bool(args.compare_encoder))
        except Exception:
            print(f"the app's log:\n{log.read_text()[-3000:]}", file=sys.stderr)
            raise
        finally:
            stop(process)
    for name, path in shots.items():
        print(f"{name}: {path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
