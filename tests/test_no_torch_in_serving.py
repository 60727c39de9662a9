"""Serving code (export.runtime, index, app) must not import torch (DESIGN.md)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVING_MODULES = ["export.runtime", "export.tokenizer", "export.embeddings", "export.extract", "index.build",
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


def test_app_ui_does_not_import_torch() -> None:
    if not (ROOT / "app" / "ui.py").exists():
        pytest.skip("app/ui.py is not there yet")
    loaded = _imported_heavy(["app.ui"])
    assert not any(loaded.values()), f"app.ui pulled in {[m for m, v in loaded.items() if v]}"
