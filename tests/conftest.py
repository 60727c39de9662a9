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
