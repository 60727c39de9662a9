"""CURL's learning check, on demand (``-m benchmark``): it needs more than the unit suite's time budget.

Measured on cnn-small, batch 64, AdamW, 2,000 CIFAR images (a loaded 2-core machine): 80 steps gain little
(kNN 0.291 vs the random-init floor 0.285; 0.300 with a flip and 4x the learning rate), since random crops are
CURL's only augmentation, a weak signal for semantic kNN in so few steps; with a horizontal flip added and 160
steps it reached 0.315 vs 0.285, but that run (two views plus the key encoder's pass) is about three times
the unit suite's budget for one learning test.
"""

import pytest

import trainer.objectives.curl  # noqa: F401  (registration)
from conftest import CIFAR_DIR, CIFAR_SKIP_REASON
from learning_helpers import assert_beats_floor

pytestmark = [pytest.mark.benchmark, pytest.mark.skipif(not CIFAR_DIR.exists(), reason=CIFAR_SKIP_REASON)]


def test_curl_longer_run_beats_random_init_knn_floor(cifar_2k_shards, tmp_path):
    args = ["--objective", "curl", "--optimizer", "adamw", "--lr", "4e-3", "--weight-decay", "1e-4", "--set", "flip=0.5"]
    assert_beats_floor(cifar_2k_shards, tmp_path, "curl", 160, args, 0.02)
