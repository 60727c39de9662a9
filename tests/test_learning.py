"""Learning, measured: a short run on real CIFAR-10 beats the random-init kNN floor of the same model.

The floor is the same command with ``--max-steps 0`` (same seed, so the same initial weights).
"""
import json

import pytest

from onnx_fixtures import CIFAR_DIR, CIFAR_SKIP_REASON

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not CIFAR_DIR.exists(), reason=CIFAR_SKIP_REASON)]

MARGIN = 0.03  # kNN top-1 points above the floor; observed margins are 0.08-0.17 on this data


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from trainer.prepare import prepare

    out = tmp_path_factory.mktemp("cifar-2k")
    prepare(f"{CIFAR_DIR}/train-000000.tar.gz::{CIFAR_DIR}/test-000000.tar.gz", str(out), shard_size=1000, limit=2000)
    return out


def _knn_after(shards, run, steps, objective_args):
    from trainer.evaluate import evaluate
    from trainer.pretrain import main as pretrain

    assert pretrain(["--train-data", f"{shards}/train-*.tar.gz", "--output", str(run), "--backbone", "cnn-small",
                     "--batch-size", "64", "--max-steps", str(steps), "--log-every", "25", "--checkpoint-every", "0",
                     *objective_args]) == 0
    result = evaluate(str(run / "model"), f"{shards}/train-*.tar.gz", f"{shards}/test-000000.tar.gz", num_workers=2)
    return result["knn_top1"]


@pytest.mark.parametrize("name,steps,objective_args", [
    ("simclr", 120, ["--objective", "simclr", "--optimizer", "adamw", "--lr", "4e-3", "--weight-decay", "1e-4"]),
    ("clip", 80, ["--objective", "clip", "--lr", "4e-3", "--set", "text={width: 64, heads: 2, layers: 1, context_length: 16}"]),
])
def test_short_run_beats_random_init_knn_floor(shards, tmp_path, name, steps, objective_args):
    floor = _knn_after(shards, tmp_path / "floor", 0, objective_args)
    trained = _knn_after(shards, tmp_path / "trained", steps, objective_args)
    print(json.dumps({"objective": name, "steps": steps, "floor_knn_top1": floor, "knn_top1": trained}))
    assert trained >= floor + MARGIN, f"{name}: kNN {trained:.3f} after {steps} steps vs floor {floor:.3f}"
