"""Losses are pure functions of tensors: no process ranks, no devices, no ``args`` (DESIGN.md, issue 16).

The objective that calls a loss all-reduces what the paper defines over the global batch and passes the
result (or a reducing callable) in; a loss module never imports the distributed machinery itself."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

LOSSES = Path(__file__).resolve().parents[1] / "trainer" / "losses"
FORBIDDEN_MODULES = ("torch.distributed", "trainer.distributed", "accelerate")
FORBIDDEN_CALLS = ("cuda", "get_rank", "get_world_size", "all_reduce", "all_gather")


def _violations(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.startswith(FORBIDDEN_MODULES)]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(FORBIDDEN_MODULES):
            found.append(node.module)
        elif isinstance(node, ast.Attribute) and node.attr in FORBIDDEN_CALLS:
            found.append(f".{node.attr}")
        elif isinstance(node, ast.arg) and node.arg in ("args", "device", "rank"):
            found.append(f"parameter {node.arg!r}")
    return found


def test_the_checker_catches_what_it_looks_for() -> None:
    bad = ("import torch.distributed as dist\nfrom trainer.distributed import gather_with_grad\n"
           "def loss(x, args, device):\n    return x.cuda() * dist.get_rank()\n")
    assert set(_violations(bad)) == {"torch.distributed", "trainer.distributed", ".cuda", ".get_rank",
                                     "parameter 'args'", "parameter 'device'"}


@pytest.mark.parametrize("path", sorted(LOSSES.glob("*.py")), ids=lambda p: p.name)
def test_loss_module_is_free_of_ranks_and_devices(path: Path) -> None:
    assert not _violations(path.read_text(encoding="utf-8")), f"{path.name}: {_violations(path.read_text())}"
