"""Serving code (export.runtime, index, app) must not import torch (DESIGN.md)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
SERVING_MODULES = ["export.contract", "export.runtime", "export.tokenizer", "export.captions", "export.embeddings",
                   "export.extract", "export.extraction", "export.ray_extract", "index.build", "index.construct",
                   "index.ray_build", "index.duplicates", "trainer.data.storage", "trainer.data.slots",
                   "index.search", "index.select", "index.store", "index.devices", "index.tune", "index.sources",
                   "index.add", "index.evaluate", "index.merge", "trainer.data.shards", "trainer.data.preprocess"]
HEAVY = ["torch", "torchvision", "open_clip", "timm", "accelerate", "webdataset"]


def _imported_heavy(modules: list[str]) -> dict:
    """Import ``modules`` in a fresh interpreter and report which heavy packages came along."""
    script = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_runtime_and_index_do_not_import_torch() -> None:
    loaded = _imported_heavy(SERVING_MODULES)
    assert not any(loaded.values()), f"serving imports pulled in {[m for m, v in loaded.items() if v]}"


APP_MODULES = sorted(f"app.{path.stem}" for path in (ROOT / "app").glob("*.py") if path.stem != "__init__")


def test_app_modules_do_not_import_torch() -> None:
    assert {"app.ui", "app.search", "app.map_tab", "app.diagnostics", "app.compare_tab"} <= set(APP_MODULES)
    loaded = _imported_heavy(APP_MODULES)
    assert not any(loaded.values()), f"the app modules pulled in {[m for m, v in loaded.items() if v]}"


def test_gradio_and_matplotlib_do_not_import_torch() -> None:
    """What the app imports lazily when it builds its UI and draws its plots."""
    loaded = _imported_heavy(["gradio", "gradio_client", "matplotlib.figure", "pyarrow.compute", "app.ui"])
    assert not any(loaded.values()), f"gradio/matplotlib pulled in {[m for m, v in loaded.items() if v]}"
