"""Collapse diagnostics: embedding_std on known inputs, and the loop flags a collapsed run in its metrics."""
import json

import pytest
import torch

from trainer.objectives import register
from trainer.objectives.diagnostics import COLLAPSE_THRESHOLD, embedding_std, is_collapsed
from trainer.objectives.simclr import SimCLR


def test_embedding_std_of_constant_embeddings_is_zero():
    z = torch.tensor([[3.0, 4.0], [3.0, 4.0], [6.0, 8.0]])  # one direction: normalised rows are equal
    assert embedding_std(z).item() == pytest.approx(0.0, abs=1e-7)
    assert is_collapsed(embedding_std(z).item())


def test_embedding_std_by_hand():
    # Normalised rows (1, 0) and (0, 1): per-dim std (unbiased, N=2) = sqrt(0.5); mean over dims sqrt(0.5);
    # times sqrt(D = 2) -> 1.0.
    z = torch.tensor([[2.0, 0.0], [0.0, 5.0]])
    assert embedding_std(z).item() == pytest.approx(1.0, abs=1e-6)


def test_embedding_std_of_spread_embeddings_is_near_one_and_rejects_bad_shapes():
    z = torch.randn(4096, 64, generator=torch.Generator().manual_seed(0))
    assert embedding_std(z).item() == pytest.approx(1.0, abs=0.02)
    assert not is_collapsed(embedding_std(z).item())
    with pytest.raises(ValueError):
        embedding_std(torch.randn(1, 8))


@register
class _ConstantEmbeddings(SimCLR):
    """SimCLR whose reported embeddings are constant: the loop must flag collapse."""

    key = "test-collapsed"

    def forward(self, batch):
        outputs = super().forward(batch)
        return {**outputs, "embedding_std": embedding_std(torch.ones(4, 8))}


def _tiny_shards(tmp_path):
    from PIL import Image

    from trainer.prepare import prepare

    source = tmp_path / "images"
    for label in ("a", "b"):
        (source / label).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (16, 16), (i * 20, 40 if label == "a" else 200, 90)).save(source / label / f"{i}.png")
    prepare(str(source), str(tmp_path / "shards"), shard_size=16)
    return tmp_path / "shards"


def test_collapsed_metrics_are_written(tmp_path, caplog):
    from trainer.pretrain import main

    shards = _tiny_shards(tmp_path)
    run = tmp_path / "run"
    args = ["--train-data", f"{shards}/train-*.tar*", "--output", str(run), "--backbone", "cnn-small",
            "--batch-size", "4", "--max-steps", "2", "--log-every", "1", "--checkpoint-every", "0",
            "--image-size", "16", "--set", "projection_hidden_dim=16", "--set", "projection_dim=8"]
    with caplog.at_level("WARNING"):
        assert main(["--objective", "test-collapsed", *args]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records and all(r["collapsed"] is True and r["embedding_std"] < COLLAPSE_THRESHOLD for r in records)
    assert "collapsed" in caplog.text
    assert main(["--objective", "simclr", *args[:3], str(tmp_path / "healthy"), *args[4:]]) == 0
    healthy = [json.loads(line) for line in (tmp_path / "healthy" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["collapsed"] is False for r in healthy)
