"""Longer learning checks, on demand (``-m benchmark``), for the ViT objectives of issue 18 whose 300-step row in
``RESULTS_learning.md`` did not clear its random-init floor by 2 points. Each uses the settings of its
``bench_learning.py`` row (``SETTINGS``: vit-micro-cifar, batch 64, 2,000 CIFAR-10 images, seed 0) for more
steps, with the overrides named below, and is judged by the evaluation its paper reports: a linear probe
(``trainer.evaluate --linear``) for the reconstruction and predictive objectives (mae, simmim, aim, ijepa), kNN
top-1 for the rest; no logged step may be flagged as collapsed.

Measured on the 2-core AMD EPYC (no GPU), `pytest -m benchmark -s tests/benchmarks/test_objectives_v_learning.py`
(4 passed, 1 expected failure, 22 minutes alone); linear top-1 against the same command's floor, none collapsed:
- capi: 300 steps 0.334 vs 0.312 (+2.2), its RESULTS_learning.md row.
- mae: 300 steps 0.360 vs 0.354 (+0.6); 1200 steps 0.397 (+4.3).
- simmim: 300 steps 0.320 vs 0.310 (+1.0); 1200 steps 0.334 (+2.4).
- aim: 300 steps 0.314 vs 0.310 (+0.4); 1200 steps 0.381 (+7.1).
- ijepa does NOT clear its floor: 300 steps 0.298 vs 0.310 (-1.2), 1200 steps 0.304 (-0.6); a strict expected
  failure (a fix that makes it pass fails the suite until this file is updated). kNN at 300 steps: 0.248 vs 0.263.
- dinov2 with its row's settings does not clear its kNN floor by 2 points: 300 steps 0.279 vs 0.274 (+0.5), 1200
  steps 0.287 (+1.3), not collapsed (22 minutes alone); with 256-wide heads (``hidden_dim=256``, 0.6 s a step
  instead of 1.1) 0.290 at both 600 and 3000 steps (+1.6). The row's lr, 4e-3 per 256 images, is 8x the recipe's
  5e-4: at 1e-3 per 256 (``DINOV2_OVERRIDES``) it reaches 0.304 (+3.0) in 600 steps (2e-3: 0.299), which this
  check uses: its case alone, 1 passed in 324 s (floor 0.274, kNN 0.304, none collapsed).
- ibot does NOT clear it either: kNN 300 steps 0.262 vs 0.274 (-1.2), 1200 steps 0.268 (-0.6), not collapsed
  (32 minutes alone: its teacher runs the 2048-wide DINO head on every patch token); a strict expected failure.
  dinov2's overrides do not rescue it: 600 steps at lr 1e-3 with 256-wide heads give 0.260 (-1.4).
- ijepa at lower learning rates (the rows' 4e-3 per 256 is 32x the recipe's 1.25e-4) does no better. Linear top-1
  against 0.310:
  - lr 1e-3: 600 steps 0.314 (+0.4), 1200 steps 0.315 (+0.5);
  - lr 2.5e-4: 1200 steps 0.320 (+1.0), 3000 steps 0.310 (+0.0; its loss falls to 0.03).
"""
import json

import pytest

from bench_learning import SETTINGS  # the rows' settings: this file adds steps and the overrides below
from conftest import CIFAR_DIR, CIFAR_SKIP_REASON
from learning_helpers import scores_after

pytestmark = [pytest.mark.benchmark, pytest.mark.skipif(not CIFAR_DIR.exists(), reason=CIFAR_SKIP_REASON)]

IJEPA_BELOW_FLOOR = pytest.mark.xfail(strict=True, reason="ijepa on vit-micro-cifar stays below its linear floor "
                                      "at 300 and 1200 steps (module docstring)")
# dinov2 at a quarter of the rows' lr (1e-3 per 256 images, nearer the recipe's 5e-4) with 256-wide heads
DINOV2_OVERRIDES = ["--lr", "1e-3", "--set", "hidden_dim=256"]
CASES = [("capi", 300, "linear_top1", []), ("mae", 1200, "linear_top1", []), ("simmim", 1200, "linear_top1", []),
         ("aim", 1200, "linear_top1", []), pytest.param("ijepa", 1200, "linear_top1", [], marks=IJEPA_BELOW_FLOOR),
         ("dinov2", 600, "knn_top1", DINOV2_OVERRIDES),
         pytest.param("ibot", 1200, "knn_top1", [], marks=pytest.mark.xfail(
             strict=True, reason="ibot on vit-micro-cifar stays below its kNN floor at 1200 steps"))]


@pytest.mark.parametrize("name,steps,metric,overrides", CASES)
def test_longer_run_beats_random_init_floor(cifar_2k_shards, tmp_path, name, steps, metric, overrides):
    _, settings = SETTINGS[name]
    args = ["--objective", name, *settings, *overrides]
    linear = metric == "linear_top1"
    floor = scores_after(cifar_2k_shards, tmp_path / "floor", 0, args, linear=linear)[metric]
    trained = scores_after(cifar_2k_shards, tmp_path / "trained", steps, args, linear=linear)[metric]
    print(json.dumps({"objective": name, "steps": steps, "metric": metric, "floor": floor, "trained": trained}))
    records = [json.loads(line) for line in (tmp_path / "trained" / "metrics.jsonl").read_text().splitlines()]
    assert records and all(r["collapsed"] is False for r in records)
    assert trained >= floor + 0.02, f"{name}: {metric} {trained:.3f} after {steps} steps vs floor {floor:.3f}"
