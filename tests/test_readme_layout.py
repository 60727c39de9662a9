"""The README's Layout section names every module of the four packages, and names none that is gone."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("trainer", "export", "index", "app")
# Folders the Layout describes as "one file per objective / loss family": their members are not listed one by one.
ONE_FILE_EACH = ("trainer/losses", "trainer/objectives")
SHARED_IN_ONE_FILE_EACH = {"base.py", "options.py", "two_view.py", "momentum.py", "diagnostics.py", "support_set.py"}


def _layout() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Layout"):]
    return section[: section.index("\n## ", 4)]


def test_layout_names_every_module() -> None:
    layout = _layout()
    missing = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name == "__init__.py" or (path.name == "__main__.py" and package != "app"):
                continue
            folder = str(path.parent.relative_to(ROOT))
            if folder in ONE_FILE_EACH and path.name not in SHARED_IN_ONE_FILE_EACH:
                continue
            if not re.search(rf"(?<![\w.]){re.escape(path.stem)}\.py\b", layout):
                missing.append(str(path.relative_to(ROOT)))
    assert not missing, f"README's Layout section does not name: {missing}"


def test_layout_names_no_missing_module() -> None:
    modules = {path.name for package in PACKAGES for path in (ROOT / package).rglob("*.py")}
    named = set(re.findall(r"(?<![\w./])(\w+\.py)\b", _layout()))
    gone = sorted(named - modules - {"gpu_check.py"})
    assert not gone, f"README's Layout section names modules that do not exist: {gone}"
