"""LiT (Zhai et al. 2022): the image tower comes from a weights file written by the plain library (or a manyview
model), is locked -- no gradient, out of the optimizer, batch norm statistics frozen in train mode, unchanged after
optimizer steps -- while the text tower learns with the CLIP or the SigLIP loss; without --init-from it refuses."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import trainer.objectives  # noqa: F401  (registration)
from distributed_helpers import assert_two_processes_match_one
from trainer.config import OptimConfig
from trainer.models import EmbeddingModel, ModelConfig, TextConfig, save_model
from trainer.objectives import ObjectiveSpec, get_objective
from trainer.optim import build_optimizer

TEXT = {"width": 32, "heads": 2, "layers": 1, "context_length": 8}


def _batch(rows: int = 8, size: int = 32, seed: int = 4) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(rows, 3, size, size, generator=generator),
            "tokens": torch.randint(1, 400, (rows, 8), generator=generator), "id": torch.arange(rows)}


def _lit(init_from: str | None, backbone: str, loss: str = "clip", image_size: int = 32, **spec):
    torch.manual_seed(0)
    return get_objective("lit").build(ObjectiveSpec(backbone=backbone, image_size=image_size, init_from=init_from,
                                                    options={"loss": loss, "text": TEXT}, **spec))


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory) -> tuple[Path, dict]:
    """What a user has: torchvision's resnet18 (with its classifier), saved by torchvision's own model, with batch
    norm statistics that differ from a fresh model's (as a trained one's do)."""
    import torchvision

    torch.manual_seed(123)
    source = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        for module in source.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(source.state_dict(), path)
    return path, {k: v.clone() for k, v in source.state_dict().items() if not k.startswith("fc.")}


def test_refuses_without_init_from() -> None:
    with pytest.raises(ValueError, match=r"lit: LiT .* needs --init-from PATH .*timm / torchvision / open_clip"):
        _lit(None, "cnn-small")


def test_refuses_an_unknown_loss(resnet18_file) -> None:
    with pytest.raises(ValueError, match=r"loss must be one of \['clip', 'siglip'\], got 'softmax'"):
        _lit(str(resnet18_file[0]), "resnet18", loss="softmax")


def _backbone_state(objective) -> dict:
    return {k: v.clone() for k, v in objective.encoder.backbone.state_dict().items()}


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_the_library_file_is_locked_and_the_text_tower_learns(resnet18_file, loss) -> None:
    path, reference = resnet18_file
    lit = _lit(str(path), "resnet18", loss=loss)
    loaded = lit.encoder.backbone.state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[k], v) for k, v in reference.items())
    # No image head: the text tower maps straight into resnet18's 512-d feature space.
    assert lit.encoder.image_projection is None and lit.encoder.embed_dim == 512
    assert lit.encoder.encode_text(_batch()["tokens"]).shape == (8, 512)

    locked = {id(p) for p in lit.encoder.backbone.parameters()}
    assert not any(p.requires_grad for p in lit.encoder.backbone.parameters())
    groups = lit.parameter_groups(weight_decay=0.01)
    in_optimizer = [p for group in groups for p in group["params"]]
    assert not locked & {id(p) for p in in_optimizer}
    assert {id(p) for p in lit.encoder.text.parameters()} <= {id(p) for p in in_optimizer}
    optimizer = build_optimizer(groups, OptimConfig(optimizer="adamw", weight_decay=0.01), lr=1e-3)

    lit.train()
    batch_norms = [m for m in lit.encoder.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert batch_norms and not any(m.training for m in batch_norms) and lit.encoder.text.training
    text_before = {k: v.clone() for k, v in lit.encoder.text.state_dict().items()}
    scale_before = lit.logits.logit_scale.item()
    for step in range(3):
        optimizer.zero_grad(set_to_none=True)
        outputs = lit(_batch(seed=step))
        outputs["loss"].backward()
        assert all(p.grad is None for p in lit.encoder.backbone.parameters())
        optimizer.step()
        assert torch.isfinite(outputs["loss"])
    after = lit.encoder.backbone.state_dict()  # weights and batch norm running statistics, bit for bit
    assert all(torch.equal(after[k], v) for k, v in reference.items())
    changed = [k for k, v in lit.encoder.text.state_dict().items() if not torch.equal(v, text_before[k])]
    assert len(changed) > len(text_before) // 2
    assert lit.logits.logit_scale.item() != scale_before
    card = lit.model_card_extras()
    assert set(card) == ({"logit_scale", "logit_bias"} if loss == "siglip" else {"logit_scale"})
    assert card["logit_scale"] == pytest.approx(math.exp(lit.logits.logit_scale.item()))


def test_initial_logit_parameters(resnet18_file) -> None:
    clip = _lit(str(resnet18_file[0]), "resnet18")
    assert clip.logits.logit_scale.item() == pytest.approx(math.log(10.0)) and clip.logits.logit_bias is None
    siglip = _lit(str(resnet18_file[0]), "resnet18", loss="siglip")
    assert siglip.model_card_extras() == pytest.approx({"logit_scale": 10.0, "logit_bias": -10.0})


def test_a_file_of_another_backbone_is_refused(resnet18_file) -> None:
    from trainer.init_from import InitFromError

    with pytest.raises(InitFromError, match="shape differs"):
        _lit(str(resnet18_file[0]), "resnet18-cifar")


@pytest.fixture(scope="module")
def clip_model_dir(tmp_path_factory) -> tuple[Path, dict]:
    """A manyview RUN/model of an image-text model: cnn-small + a 24-d image projection + a text tower."""
    torch.manual_seed(7)
    model = EmbeddingModel(ModelConfig(backbone="cnn-small", image_size=16, image_projection=24,
                                       mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], text=TextConfig(**TEXT)))
    directory = tmp_path_factory.mktemp("run") / "model"
    save_model(model, str(directory), {"objective": "clip", "steps": 5})
    return directory, {k: v.clone() for k, v in model.state_dict().items()}


def test_a_manyview_model_keeps_its_locked_projection(clip_model_dir) -> None:
    directory, reference = clip_model_dir
    lit = _lit(str(directory), "cnn-small", loss="siglip", image_size=16)
    config = lit.encoder.config
    assert config.image_projection == 24 and lit.encoder.embed_dim == 24
    assert config.mean == [0.5, 0.5, 0.5] and config.std == [0.25, 0.25, 0.25]  # the tower's own normalisation
    state = lit.encoder.state_dict()
    assert all(torch.equal(state[k], v) for k, v in reference.items())  # text tower too: same shape
    assert not any(p.requires_grad for p in lit.encoder.image_projection.parameters())
    lit.train()
    lit(_batch(size=16))["loss"].backward()
    assert lit.encoder.image_projection.weight.grad is None and lit.encoder.text.text_projection.grad is not None


def _build_two_process():
    # cnn-small with batch norm, locked: in eval mode, so the one- and two-process runs agree exactly.
    torch.manual_seed(0)
    return get_objective("lit").build(ObjectiveSpec(backbone="cnn-small", image_size=16,
                                                    init_from=str(_SHARED["model"]),
                                                    options={"loss": _SHARED["loss"], "text": TEXT}))


def _two_process_batch() -> dict:
    return _batch(size=16)


_SHARED: dict = {}


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_two_processes_match_one(clip_model_dir, loss, tmp_path) -> None:
    _SHARED.update(model=clip_model_dir[0], loss=loss)  # read by the forked workers
    assert_two_processes_match_one(_build_two_process, _two_process_batch, tmp_path)


def test_trains_through_the_loop_and_saves_the_locked_tower(clip_model_dir, tmp_path) -> None:
    from onnx_fixtures import make_shard
    from trainer.models import load_model
    from trainer.pretrain import main as pretrain

    directory, reference = clip_model_dir
    make_shard(tmp_path / "train-000000.tar", count=32, start=0, seed=3)
    run = tmp_path / "lit"
    status = pretrain(["--objective", "lit", "--train-data", f"{tmp_path}/train-*.tar", "--output", str(run),
                       "--backbone", "cnn-small", "--image-size", "16", "--init-from", str(directory),
                       "--batch-size", "16", "--max-steps", "3", "--log-every", "1", "--num-workers", "0",
                       "--set", "text={context_length: 8, width: 32, heads: 2, layers: 1}"])
    assert status == 0
    model, card = load_model(str(run / "model"))
    saved = model.state_dict()
    image_side = [k for k in reference if not k.startswith("text.")]
    assert all(torch.equal(saved[k], reference[k]) for k in image_side)
    assert any(not torch.equal(saved[k], reference[k]) for k in reference if k.startswith("text."))
    assert card["objective"] == "lit" and card["logit_scale"] > 0 and "logit_bias" not in card
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]


def test_micro_batches_give_the_big_batch_gradients(clip_model_dir) -> None:
    from distributed_helpers import gradients
    from trainer.grad_cache import grad_cache_backward

    batch = _batch(size=16)
    reference = _lit(str(clip_model_dir[0]), "cnn-small", loss="siglip", image_size=16).train()
    reference(batch)["loss"].backward()
    lit = _lit(str(clip_model_dir[0]), "cnn-small", loss="siglip", image_size=16).train()
    grad_cache_backward(lit, batch, 3)
    want, got = gradients(reference), gradients(lit)
    assert want.keys() == got.keys() and not any(k.startswith("encoder.backbone.") for k in want)
    for name, grad in want.items():
        assert torch.allclose(got[name], grad, atol=1e-5, rtol=1e-4), name
