"""Index benchmark (``bench_index.py``) as an on-demand test: ``make benchmark`` (never in the default run).

Environment: BENCH_INDEX_COUNT (vectors of the hard mixture, 1000000), BENCH_INDEX_TYPES (';'-separated
factory strings, default: IVF4096,Flat;IVF4096,PQ32,RFlat;HNSW32), BENCH_INDEX_REPEATS (3),
BENCH_INDEX_CIFAR (1: also the 60,000 CIFAR-10 embeddings when the shards are there),
BENCH_OUTPUT (append the Markdown tables to this file), BENCH_CHECK_TARGETS (1: fail unless the set is
hard, recall@10 of IVF4096,Flat at nprobe=1 < 0.5, and some index reaches recall@10 >= 0.95 at >= 50x the
queries/s of exact search on the mixture, batched or one query per call; 0: only check that every index
was built and measured). The committed figures: ``tests/benchmarks/RESULTS_index.md``.
"""
from __future__ import annotations

import importlib.util
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _driver():
    spec = importlib.util.spec_from_file_location("bench_index", os.path.join(HERE, "bench_index.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env(name: str, default: str) -> str:
    return os.environ.get(name, "").strip() or default


def _check(result: dict) -> None:
    for row in result["rows"]:
        assert row["qps"] > 0 and row["exact_qps"] > 0, row
        assert 0.0 <= row["recall@10"] <= 1.0, row


@pytest.mark.benchmark
def test_index_types_against_exact(tmp_path):
    driver = _driver()
    argv = ["--dataset", "mixture", "--count", _env("BENCH_INDEX_COUNT", "1000000"),
            "--repeats", _env("BENCH_INDEX_REPEATS", "3"), "--workdir", str(tmp_path)]
    if os.environ.get("BENCH_INDEX_TYPES"):
        argv += ["--types", os.environ["BENCH_INDEX_TYPES"]]
    if os.environ.get("BENCH_OUTPUT"):
        argv += ["--output", os.environ["BENCH_OUTPUT"]]
    result = driver.run(argv)
    _check(result)
    if _env("BENCH_CHECK_TARGETS", "1") == "1":
        def speedup(row: dict) -> float:  # batched or one query per call, whichever the index does better in
            return max(row["speedup"], row.get("speedup_single", 0)) if row["recall@10"] >= 0.95 else 0.0

        assert result["hardness"] is None or result["hardness"] < 0.5, "the set is too easy:\n" + result["markdown"]
        assert max(map(speedup, result["rows"])) >= 50, "target missed:\n" + result["markdown"]


@pytest.mark.benchmark
def test_cifar_embeddings(tmp_path):
    driver = _driver()
    if _env("BENCH_INDEX_CIFAR", "1") != "1":
        pytest.skip("BENCH_INDEX_CIFAR=0")
    if not os.path.exists(os.path.join(driver.DEFAULT_DATA, "test-000000.tar.gz")):
        pytest.skip(f"CIFAR-10 shards not found at {driver.DEFAULT_DATA}")
    argv = ["--dataset", "cifar", "--repeats", _env("BENCH_INDEX_REPEATS", "3"), "--workdir", str(tmp_path)]
    if os.environ.get("BENCH_OUTPUT"):
        argv += ["--output", os.environ["BENCH_OUTPUT"]]
    _check(driver.run(argv))
