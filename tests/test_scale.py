"""WebDataset at scale: remote shards through ``pipe:`` URLs with an explicit epoch length, and a clear error
when an epoch cannot be known."""
import json
import logging

import pytest

from trainer.pretrain import main

pytestmark = pytest.mark.slow


def _common(shards, run) -> list[str]:
    pipes = "::".join(f"pipe:cat {shards}/train-{i:06d}.tar.gz" for i in range(2))
    return ["--objective", "simclr", "--train-data", pipes, "--output", str(run), "--backbone", "cnn-small",
            "--batch-size", "16", "--num-workers", "1", "--log-every", "1", "--checkpoint-every", "0",
            "--set", "projection_hidden_dim=64"]


def test_pipe_urls_train_with_an_explicit_epoch_length(cifar_2k_shards, tmp_path):
    run = tmp_path / "pipe"
    assert main([*_common(cifar_2k_shards, run), "--epochs", "0.024", "--samples-per-epoch", "2000"]) == 0
    config = json.loads((run / "train_config.json").read_text())
    assert config["total_steps"] == 3  # ceil(0.024 * 2000 / 16)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["corrupt_skipped"] == 0


def test_epochs_over_pipe_urls_without_an_epoch_length_is_a_clear_error(cifar_2k_shards, tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        assert main([*_common(cifar_2k_shards, tmp_path / "no-length"), "--epochs", "1"]) == 2
    assert "--samples-per-epoch" in caplog.text
