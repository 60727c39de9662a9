"""Shared fixtures: small CIFAR-10 shard sets with dense ids, made once per session."""
from pathlib import Path

import pytest

CIFAR_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"
CIFAR_SKIP_REASON = f"CIFAR-10 shards not found at {CIFAR_DIR} (../shared/data/cifar10 relative to the repo root)"


@pytest.fixture(scope="session")
def cifar_2k_shards(tmp_path_factory) -> Path:
    """2,000 CIFAR-10 train and 2,000 test images in shards of 1,000 (dense ids), for learning checks."""
    if not CIFAR_DIR.exists():
        pytest.skip(CIFAR_SKIP_REASON)
    from trainer.prepare import prepare

    out = tmp_path_factory.mktemp("cifar-2k")
    prepare(f"{CIFAR_DIR}/train-000000.tar.gz::{CIFAR_DIR}/test-000000.tar.gz", str(out), shard_size=1000, limit=2000)
    return out


# The longest modules first: `make test` runs two xdist workers, one module each at a time, so a long module
# started last would run alone at the end while the other worker idles.
LONG_MODULES = ("test_serving_install.py", "test_smoke_every_objective.py", "test_learning_distill.py",
                "test_learning.py", "test_moco.py", "test_end_to_end.py", "test_recipes.py", "test_batched_augment.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: position for position, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_MODULES)))  # stable: order within a module kept
