"""A 3-step smoke run of every registered objective through the real command line and loop.

Each run uses the objective's own recipe (trainer/recipes/<key>.yaml) on cnn-small (vit-micro-cifar for the
objectives that declare ``requires_patch_tokens``) at 32 px and a tiny generated shard set, so it exercises what
a user's first `trainer/pretrain.py --objective KEY` does: the recipe parses, the views decode and batch in the
data workers, the objective's forward/backward and step hooks run through the loop, a checkpoint is written,
and RUN/model is saved and loads again with finite outputs. The ViT objectives' models also export to ONNX with the
uint8-in-graph contract and parity (the pooling and register tokens their papers use included), and one of them
serves search in the app. Learning itself is checked elsewhere (the learning checks in this suite and in
tests/benchmarks/)."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

import trainer.objectives  # noqa: F401  (registration)
from objective_fixtures import smoke_backbone, start_args
from onnx_fixtures import make_shard
from trainer.objectives import get_objective, list_objectives


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("smoke_shards")
    make_shard(root / "train-000000.tar", count=48, start=0, seed=3)
    make_shard(root / "train-000001.tar", count=48, start=48, seed=4)
    return root


@pytest.mark.parametrize("key", list_objectives())
def test_three_steps_through_the_loop(key: str, tiny_shards: Path, tmp_path: Path) -> None:
    from trainer.models import load_model
    from trainer.pretrain import main as pretrain

    run = tmp_path / key
    # Views are drawn in the main process (no data worker: a worker's start-up costs about as much as the 3 steps);
    # what a worker needs of the recipe, that it pickles, is checked here, and test_end_to_end runs real workers.
    from trainer.config import TrainConfig, load_recipe, recipe_path
    from trainer.objectives import ObjectiveSpec

    config = TrainConfig(objective=key)
    if Path(recipe_path(key)).exists():  # objectives registered by other tests have none
        load_recipe(recipe_path(key), config)
    start = start_args(key, tmp_path)
    objective = get_objective(key).build(ObjectiveSpec(backbone=smoke_backbone(key), image_size=32,
                                                       options={**config.objective_options, **start.options},
                                                       num_train_samples=96, total_steps=3, global_batch_size=16,
                                                       **start.spec))
    pickle.loads(pickle.dumps(objective.views()))
    extra = start.cli
    status = pretrain(["--objective", key, "--train-data", f"{tiny_shards}/train-*.tar", "--output", str(run),
                       "--backbone", smoke_backbone(key), "--batch-size", "16", "--max-steps", "3", "--log-every", "1",
                       "--checkpoint-every", "2", "--num-workers", "0", *extra])
    assert status == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in rows), rows
    assert (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir())
    model, config = load_model(str(run / "model"))
    assert config["objective"] == key and config["steps"] == 3
    with torch.no_grad():
        images = torch.randn(2, model.config.channels, model.config.image_size, model.config.image_size)
        embedding = model.encode_image(images)
    assert embedding.shape == (2, config["embed_dim"]) and torch.isfinite(embedding).all()
    if get_objective(key).requires_patch_tokens:
        from export.onnx import export_model

        report = export_model(str(run / "model"), str(run / "onnx"), uint8_input=True)
        assert report["image"]["max_abs_diff"] <= 1e-4, report


def test_a_vit_objective_serves_search_in_the_app(tiny_shards: Path, tmp_path: Path) -> None:
    """mae's model (class token) and ijepa's (mean of the patch tokens, with register tokens) export, index and answer
    image and id queries through the app's search functions: the first hit of an indexed image is itself."""
    from app.ui import build_app, neighbours_for_id, neighbours_for_image
    from export.onnx import export_model
    from export.runtime import Encoder
    from index.build import build_index
    from index.search import Index
    from trainer.pretrain import main as pretrain

    for key, extra in (("mae", []), ("ijepa", ["--register-tokens", "2"])):
        run = tmp_path / key
        assert pretrain(["--objective", key, "--train-data", f"{tiny_shards}/train-*.tar", "--output", str(run),
                         "--backbone", "vit-micro-cifar", "--batch-size", "16", "--max-steps", "1",
                         "--num-workers", "0", *extra]) == 0
        export_model(str(run / "model"), str(run / "onnx"), uint8_input=True)
        build_index(str(run / "onnx"), f"{tiny_shards}/train-000000.tar", str(run / "index"), progress=False)
        encoder, index = Encoder(str(run / "onnx")), Index.load(str(run / "index"))
        assert index.count == 48
        sample = int(index.ids[5])
        hits = neighbours_for_image(encoder, index, index.image(sample), 3)
        assert len(hits) == 3 and hits[0].id == sample and hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert neighbours_for_id(encoder, index, sample, 3)[0].id == sample
        build_app(encoder, index)  # the Blocks build with this encoder
