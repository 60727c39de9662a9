"""Longer learning checks, on demand (``-m benchmark``), for the ViT objectives of issue 18 whose 300-step row in
``RESULTS_learning.md`` did not clear its random-init floor by 2 points. Each uses the settings of its
``bench_learning.py`` row (``SETTINGS``: vit-micro-cifar, batch 64, 2,000 CIFAR-10 images, seed 0) for more
steps, and is judged by the evaluation its paper reports: a linear probe (``trainer.evaluate --linear``) for the
reconstruction and predictive objectives (mae, simmim, aim, ijepa), kNN top-1 for the rest; no logged step may
be flagged as collapsed.

Measured on the 2-core AMD EPYC (no GPU), `pytest -m benchmark -s tests/benchmarks/test_objectives_v_learning.py`
(4 passed, 1 expected failure, 22 minutes alone); linear top-1 against the same command's floor, none collapsed:
- capi: 300 steps 0.334 vs 0.312 (+2.2), its RESULTS_learning.md row.
- mae: 300 steps 0.360 vs 0.354 (+0.6); 1200 steps 0.397 (+4.3).
- simmim: 300 steps 0.320 vs 0.310 (+1.0); 1200 steps 0.334 (+2.4).
- aim: 300 steps 0.314 vs 0.310 (+0.4); 1200 steps 0.381 (+7.1).
- ijepa does NOT clear its floor: 300 steps 0.298 vs 0.310 (-1.2), 1200 steps 0.304 (-0.6); a strict expected
  failure (a fix that makes it pass fails the suite until this file is updated). kNN at 300 steps: 0.248 vs 0.263.
- dinov2 does NOT clear its kNN floor by 2 points either: 300 steps 0.279 vs 0.274 (+0.5), 1200 steps 0.287 (+1.3),
  not collapsed (measured alone with this file's settings, 22 minutes for 1200 steps); a strict expected failure.
  With the heads' hidden width cut from 2048 to 256 (``--set hidden_dim=256``, 0.6 s a step instead of 1.1) and
  3000 steps it reaches 0.290 (+1.6), none of 120 logged steps collapsed (27 minutes alone): still short.
- ibot does NOT clear it either: kNN 300 steps 0.262 vs 0.274 (-1.2), 1200 steps 0.268 (-0.6), not collapsed
  (32 minutes alone: its teacher runs the 2048-wide DINO head on every patch token); a strict expected failure.
"""
import json

import pytest

from bench_learning import SETTINGS  # the rows' settings: this file only adds steps
from conftest import CIFAR_DIR, CIFAR_SKIP_REASON
from learning_helpers import scores_after

pytestmark = [pytest.mark.benchmark, pytest.mark.skipif(not CIFAR_DIR.exists(), reason=CIFAR_SKIP_REASON)]

IJEPA_BELOW_FLOOR = pytest.mark.xfail(strict=True, reason="ijepa on vit-micro-cifar stays below its linear floor "
                                      "at 300 and 1200 steps (module docstring)")
DINOV2_BELOW_FLOOR = pytest.mark.xfail(strict=True, reason="dinov2 on vit-micro-cifar gains +0.5 kNN points at 300 "
                                       "steps and +1.3 at 1200 (module docstring)")
CASES = [("capi", 300, "linear_top1"), ("mae", 1200, "linear_top1"), ("simmim", 1200, "linear_top1"),
         ("aim", 1200, "linear_top1"), pytest.param("ijepa", 1200, "linear_top1", marks=IJEPA_BELOW_FLOOR),
         pytest.param("dinov2", 1200, "knn_top1", marks=DINOV2_BELOW_FLOOR),
         pytest.param("ibot", 1200, "knn_top1", marks=pytest.mark.xfail(strict=True, reason="ibot on vit-micro-cifar "
                                                                         "stays below its kNN floor at 1200 steps"))]


@pytest.mark.parametrize("name,steps,metric", CASES)
def test_longer_run_beats_random_init_floor(cifar_2k_shards, tmp_path, name, steps, metric):
    _, settings = SETTINGS[name]
    args = ["--objective", name, *settings]
    linear = metric == "linear_top1"
    floor = scores_after(cifar_2k_shards, tmp_path / "floor", 0, args, linear=linear)[metric]
    trained = scores_after(cifar_2k_shards, tmp_path / "trained", steps, args, linear=linear)[metric]
    print(json.dumps({"objective": name, "steps": steps, "metric": metric, "floor": floor, "trained": trained}))
    records = [json.loads(line) for line in (tmp_path / "trained" / "metrics.jsonl").read_text().splitlines()]
    assert records and all(r["collapsed"] is False for r in records)
    assert trained >= floor + 0.02, f"{name}: {metric} {trained:.3f} after {steps} steps vs floor {floor:.3f}"
