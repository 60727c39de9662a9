"""Longer learning checks, on demand (``-m benchmark``), for the objectives of issue 17 whose 300-step row in
``RESULTS_learning.md`` did not clear the random-init kNN floor by 2 points. Each uses the settings of its
``bench_learning.py`` row (``SETTINGS``) for more steps, with the overrides named below, and checks that no
logged step was flagged as collapsed.

Measured on the 2-core AMD EPYC (no GPU), 2,000 CIFAR-10 images, batch 64, seed 0:
- nnsiam (cnn-small, floor 0.285): 300 steps 0.286 (+0.001, its RESULTS_learning.md row); 800 steps 0.326
  (+0.041), no step flagged as collapsed (1 passed in 1,799 s, sharing the machine with two other runs).
- nnbyol: 300 steps 0.278 (-0.007); 800 steps 0.299 (+0.014) with its row's settings (lr 4e-3, 10 warm-up
  steps: short of the 2 points), 0.313 (+0.028) with BYOL's longer-run settings (lr 3e-3, 20 warm-up steps,
  test_noncontrastive_learning.py), which this check uses: 8 minutes alone, measured with the same
  ``knn_after`` calls outside pytest, no step flagged as collapsed.
- smog: 300 steps 0.300 (+0.015); 600 steps 0.315 (+0.030), none collapsed (1 passed in 2,074 s, shared).
- msn and pmsn (vit-micro-cifar: width 64, depth 2, patch 4; floor 0.274) do NOT clear the floor by 2 points,
  so their entries are expected failures (strict: a fix that makes them pass fails the suite until this file
  is updated). 300 steps: msn 0.279, pmsn 0.288 (the rows); 1000 steps: msn 0.272, pmsn 0.273. Five 300-step
  variants of msn did no better (kNN 0.251-0.280): lr 8e-3 (0.280; pmsn 0.280), lr 1e-3 with SimCLR-strength
  colour jitter (0.251), lr 4e-3 with that jitter (0.254), no focal views (0.259), and two random views masked
  at 30% without focal views (0.273). The small ViT is a large part of it: SimCLR on the same vit-micro-cifar
  reaches only 0.290 at 300 steps (+0.016; 0.275 at lr 1e-3), and lightly's MSN example on the same ViT gives
  manyview's kNN within 0.3 points after the same 20 steps (RESULTS.md, 2026-12-06 21:11). A check that clears
  the floor likely needs a larger ViT (vit-tiny-cifar: about 27x vit-micro's compute per token) for thousands
  of steps: work for a GPU, not this suite's CPU.
"""
import json

import pytest

from bench_learning import SETTINGS  # the rows' settings: this file only adds steps (and the overrides below)
from conftest import CIFAR_DIR, CIFAR_SKIP_REASON
from learning_helpers import assert_beats_floor

pytestmark = [pytest.mark.benchmark, pytest.mark.skipif(not CIFAR_DIR.exists(), reason=CIFAR_SKIP_REASON)]

MSN_BELOW_FLOOR = pytest.mark.xfail(strict=True, reason="MSN/PMSN on vit-micro-cifar stay within 2 points of the "
                                     "random-init floor at 300 and 1000 steps (module docstring)")


@pytest.mark.parametrize("name,steps,overrides", [pytest.param("msn", 1000, [], marks=MSN_BELOW_FLOOR),
                                                  pytest.param("pmsn", 1000, [], marks=MSN_BELOW_FLOOR),
                                                  ("nnsiam", 800, []), ("smog", 600, []),
                                                  ("nnbyol", 800, ["--lr", "3e-3", "--warmup-steps", "20"])])
def test_longer_run_beats_random_init_knn_floor(cifar_2k_shards, tmp_path, name, steps, overrides):
    _, settings = SETTINGS[name]  # later flags win: the overrides replace the row's values
    assert_beats_floor(cifar_2k_shards, tmp_path, name, steps, ["--objective", name, *settings, *overrides], 0.02)
    records = [json.loads(line) for line in (tmp_path / "trained" / "metrics.jsonl").read_text().splitlines()]
    assert records and all("embedding_std" in r and r["collapsed"] is False for r in records)
