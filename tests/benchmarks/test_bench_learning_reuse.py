"""``bench_learning.py --reuse`` reuses a saved row only for the same arguments, steps and committed code."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _driver():
    spec = importlib.util.spec_from_file_location("bench_learning", os.path.join(HERE, "bench_learning.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=repo,
                          capture_output=True, text=True, check=True).stdout.strip()


def test_reuse_key_follows_the_committed_code(tmp_path: Path) -> None:
    driver = _driver()
    repo = tmp_path / "repo"
    (repo / "trainer").mkdir(parents=True)
    (repo / "tests").mkdir()
    _git(repo, "init", "-q")
    (repo / "trainer" / "loop.py").write_text("step = 1\n")
    (repo / "tests" / "learning_helpers.py").write_text("k = 200\n")
    (repo / "README.md").write_text("readme\n")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "first")
    first = _git(repo, "rev-parse", "HEAD")
    assert driver.code_key(repo) == first

    # Commits elsewhere do not change the key; uncommitted or untracked changes under trainer/ void it.
    (repo / "README.md").write_text("readme 2\n")
    _git(repo, "commit", "-q", "-am", "docs only")
    assert driver.code_key(repo) == first
    (repo / "trainer" / "loop.py").write_text("step = 2\n")
    assert driver.code_key(repo) is None
    _git(repo, "commit", "-q", "-am", "change the loop")
    second = _git(repo, "rev-parse", "HEAD")
    assert driver.code_key(repo) == second != first
    (repo / "trainer" / "new_objective.py").write_text("x = 1\n")
    assert driver.code_key(repo) is None
    os.remove(repo / "trainer" / "new_objective.py")
    (repo / "tests" / "learning_helpers.py").write_text("k = 20\n")
    assert driver.code_key(repo) is None
    assert driver.code_key(tmp_path / "not-a-checkout-at-all") is None


def test_saved_rows_are_reused_only_under_the_same_key() -> None:
    driver = _driver()
    args = ["--objective", "simclr", "--lr", "4e-3", "--seed", "0"]
    key = driver.reuse_key(args, 300, "a" * 40)
    assert driver.reusable({"reuse_key": key}, driver.reuse_key(list(args), 300, "a" * 40))
    assert not driver.reusable({"reuse_key": key}, driver.reuse_key(args, 300, "b" * 40))      # the code changed
    assert not driver.reusable({"reuse_key": key}, driver.reuse_key(args, 1000, "a" * 40))     # other steps
    assert not driver.reusable({"reuse_key": key}, driver.reuse_key([*args[:-1], "1"], 300, "a" * 40))
    assert driver.reuse_key(args, 300, None) is None                                          # dirty tree
    assert not driver.reusable({"reuse_key": None}, None)
    # A row saved before the code key existed matched on arguments and steps only: never reused now.
    old_row = {"objective": "simclr", "args": args, "steps": 300, "code": "c435d13"}
    assert not driver.reusable(old_row, key)
