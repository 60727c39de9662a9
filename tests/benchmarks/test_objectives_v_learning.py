"""Longer learning checks, on demand (``-m benchmark``), for the ViT objectives of issue 18 whose 300-step row in
``RESULTS_learning.md`` did not clear its random-init floor by 2 points. Each uses the settings of its
``bench_learning.py`` row (``SETTINGS``: vit-micro-cifar, batch 64, 2,000 CIFAR-10 images, seed 0) for more
steps, with the overrides named below, and is judged by the evaluation its paper reports: a linear probe
(``trainer.evaluate --linear``) for the reconstruction and predictive objectives (mae, simmim, aim, ijepa), kNN
top-1 for the rest; no logged step may be flagged as collapsed.

Measured on the 2-core AMD EPYC (no GPU), `pytest -m benchmark -s tests/benchmarks/test_objectives_v_learning.py`
(4 passed, 1 expected failure, 22 minutes alone, before ijepa's and dinov2's cases changed); linear top-1 against
the same command's floor, none collapsed:
- capi: 300 steps 0.334 vs 0.312 (+2.2), its RESULTS_learning.md row.
- mae: 300 steps 0.360 vs 0.354 (+0.6); 1200 steps 0.397 (+4.3).
- simmim: 300 steps 0.320 vs 0.310 (+1.0); 1200 steps 0.334 (+2.4).
- aim: 300 steps 0.314 vs 0.310 (+0.4); 1200 steps 0.381 (+7.1).
- ijepa with timm's learnable position embedding did NOT clear its floor (300 steps 0.298 vs 0.310, 1200 steps
  0.304; other learning rates below): the spread of its target features across images collapsed. With the
  authors' fixed 2-D sin-cos embedding (``position_embedding: sincos``, now the default) 1200 steps with the row's
  settings reach 0.338 against the 0.308 floor (+3.0; 0.343 at lr 1e-3), the spread staying near 0.6. This case
  checks that; measured with the same ``scores_after`` calls outside pytest (5 minutes alone).
- dinov2 with its row's settings does not clear its kNN floor by 2 points: 300 steps 0.279 vs 0.274 (+0.5), 1200
  steps 0.287 (+1.3), not collapsed (22 minutes alone); with 256-wide heads (``hidden_dim=256``, 0.6 s a step
  instead of 1.1) 0.290 at both 600 and 3000 steps (+1.6). The row's lr, 4e-3 per 256 images, is 8x the recipe's
  5e-4: at 1e-3 per 256 (``DINOV2_OVERRIDES``) it reaches 0.304 (+3.0) in 600 steps (2e-3: 0.299), which this
  check uses: its case alone, 1 passed in 324 s (floor 0.274, kNN 0.304, none collapsed).
- ibot does NOT clear it: kNN 300 steps 0.262 vs 0.274 (-1.2), 1200 steps 0.268 (-0.6), not collapsed
  (32 minutes alone: its teacher runs the 2048-wide DINO head on every patch token); a strict expected failure
  (a fix that makes it pass fails the suite until this file is updated). An ablation at 600 steps with dinov2's
  overrides (lr 1e-3, 256-wide heads), kNN against 0.274, says why. The term that clears the floor here is
  DINOv2's KoLeo, which iBOT does not have:
  - ibot: shared head 0.260, untied heads 0.278, teacher temperatures 0.04 (no warm-up to 0.07) 0.268 (untied
    0.274), untied with the paper's 10 local crops 0.272, without the patch loss (DINO alone) 0.244;
  - dinov2: as checked 0.304, without KoLeo 0.264, with iBOT's EMA centres instead of Sinkhorn-Knopp 0.298.
  The DINO head's teacher output stays near uniform throughout (entropy 5.5 of log 256 = 5.55 nats), and the
  student's class tokens keep about half the spread across images that KoLeo gives them (embedding_std 0.4-0.55
  against 0.98).
- ijepa with the learnable embedding at lower learning rates (the rows' 4e-3 per 256 is 32x the recipe's 1.25e-4)
  did no better, nor a context of half the patches (lr 1e-3, 1200 steps: 0.314). Linear top-1 against 0.310:
  - lr 1e-3: 600 steps 0.314 (+0.4), 1200 steps 0.315 (+0.5);
  - lr 2.5e-4: 1200 steps 0.320 (+1.0), 3000 steps 0.310 (+0.0; its loss falls to 0.03).
"""
import json

import pytest

from bench_learning import SETTINGS  # the rows' settings: this file adds steps and the overrides below
from conftest import CIFAR_DIR, CIFAR_SKIP_REASON
from learning_helpers import assert_beats_floor

pytestmark = [pytest.mark.benchmark, pytest.mark.skipif(not CIFAR_DIR.exists(), reason=CIFAR_SKIP_REASON)]

# dinov2 at a quarter of the rows' lr (1e-3 per 256 images, nearer the recipe's 5e-4) with 256-wide heads
DINOV2_OVERRIDES = ["--lr", "1e-3", "--set", "hidden_dim=256"]
CASES = [("capi", 300, "linear_top1", []), ("mae", 1200, "linear_top1", []), ("simmim", 1200, "linear_top1", []),
         ("aim", 1200, "linear_top1", []), ("ijepa", 1200, "linear_top1", []),
         ("dinov2", 600, "knn_top1", DINOV2_OVERRIDES),
         pytest.param("ibot", 1200, "knn_top1", [], marks=pytest.mark.xfail(
             strict=True, reason="ibot on vit-micro-cifar stays below its kNN floor at 1200 steps"))]


@pytest.mark.parametrize("name,steps,metric,overrides", CASES)
def test_longer_run_beats_random_init_floor(cifar_2k_shards, tmp_path, name, steps, metric, overrides):
    _, settings = SETTINGS[name]
    assert_beats_floor(cifar_2k_shards, tmp_path, name, steps, ["--objective", name, *settings, *overrides], 0.02,
                       metric)
    records = [json.loads(line) for line in (tmp_path / "trained" / "metrics.jsonl").read_text().splitlines()]
    assert records and all(r["collapsed"] is False for r in records)
