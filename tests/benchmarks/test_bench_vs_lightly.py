"""manyview vs lightly (``bench_vs_lightly.py``) as an on-demand test: ``make benchmark`` (never in the default run).

Small by default so that it finishes in about 45 minutes on 2 CPU cores (all seven methods); the environment scales it up:
BENCH_BUDGET (seconds of training per run, 120), BENCH_REPEATS (1), BENCH_METHODS (all seven: simclr,moco2,byol,simsiam,swav,dino,barlow_twins),
BENCH_EVAL_LIMIT (bank and query images, 2000; 0 = all), BENCH_LIMIT_TRAIN_SHARDS (10), BENCH_SKIP_STEPS (3),
BENCH_BATCH_SIZE (256; smaller only to smoke-test the harness),
BENCH_OUTPUT (append the results section to this Markdown file; default: printed only),
BENCH_CHECK_TARGETS (1: fail unless manyview's median images/s is at least lightly's and its kNN top-1 is
within 1 point of lightly's or better; 0: only check that both sides trained and were evaluated).
The full benchmark: ``BENCH_BUDGET=600 BENCH_EVAL_LIMIT=0 BENCH_OUTPUT=tests/benchmarks/RESULTS.md make benchmark``.
"""
from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _driver():
    spec = importlib.util.spec_from_file_location("bench_vs_lightly", os.path.join(HERE, "bench_vs_lightly.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env(name: str, default: str) -> str:
    return os.environ.get(name, "").strip() or default


@pytest.mark.benchmark
def test_manyview_matches_lightly(tmp_path):
    driver = _driver()
    if not os.path.exists(os.path.join(driver.DEFAULT_DATA, "test-000000.tar.gz")):
        pytest.skip(f"CIFAR-10 shards not found at {driver.DEFAULT_DATA}")
    try:
        driver.ensure_lightly()
    except (subprocess.CalledProcessError, RuntimeError) as error:
        pytest.skip(f"lightly could not be installed into {driver.BENCH_SITE}: {error}")
    argv = ["--budget", _env("BENCH_BUDGET", "120"), "--repeats", _env("BENCH_REPEATS", "1"),
            "--methods", _env("BENCH_METHODS", ",".join(driver.METHODS)),
            "--batch-size", _env("BENCH_BATCH_SIZE", "256"), "--skip-steps", _env("BENCH_SKIP_STEPS", "3"),
            "--limit-train-shards", _env("BENCH_LIMIT_TRAIN_SHARDS", "10"), "--workdir", str(tmp_path)]
    eval_limit = int(_env("BENCH_EVAL_LIMIT", "2000"))
    if eval_limit > 0:
        argv += ["--eval-limit", str(eval_limit)]
    if os.environ.get("BENCH_OUTPUT"):
        argv += ["--output", os.environ["BENCH_OUTPUT"]]
    print(f"\n{sys.executable} tests/benchmarks/bench_vs_lightly.py {' '.join(argv)}")
    result = driver.run(argv)

    for row in result["rows"]:
        assert math.isfinite(row["images_per_s"]) and row["images_per_s"] > 0, row
        assert 0.0 <= row["knn_top1"] <= 1.0, row
        assert row["steps"] > int(_env("BENCH_SKIP_STEPS", "3")), row
    if _env("BENCH_CHECK_TARGETS", "1") == "1":
        misses = [f"{s['method']}: images/s ratio {s['throughput_ratio']:.3f} (target >= 1), kNN diff "
                  f"{s['knn_diff_points']:+.2f} points (target >= -1)"
                  for s in result["summary"] if not (s["throughput_target_met"] and s["knn_target_met"])]
        assert not misses, "targets missed:\n" + "\n".join(misses) + "\n\n" + result["markdown"]
