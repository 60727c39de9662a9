"""``--init-from``: start from a manyview model or checkpoint, or from a weights file written by the plain library
(timm, torchvision, open_clip), with every key that does not fit listed and refused unless --init-strict false."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import trainer.objectives  # noqa: F401  (registration)
from onnx_fixtures import make_shard
from trainer.init_from import InitFromError, load_initial_weights, parse_strict
from trainer.models import EmbeddingModel, ModelConfig, TextConfig
from trainer.objectives import ObjectiveSpec, get_objective


def _equal(module_state: dict, reference: dict, prefix: str = "") -> None:
    for key, value in reference.items():
        assert torch.equal(module_state[prefix + key], value), key


def test_a_timm_vit_file_initialises_the_backbone_and_its_classifier_is_dropped(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    # What a user has: a timm ViT with a classifier, saved by timm's own model (vit-micro-cifar's architecture).
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, embed_dim=64,
                               depth=2, num_heads=2, num_classes=10)
    reference = {k: v.clone() for k, v in source.state_dict().items()}
    save_file(reference, str(tmp_path / "vit.safetensors"))
    model = EmbeddingModel(ModelConfig(backbone="vit-micro-cifar"))
    report = load_initial_weights(model, str(tmp_path / "vit.safetensors"))
    assert report.layout == "timm/torchvision" and report.dropped == ["head.bias", "head.weight"]
    assert not report.problems and report.loaded == len(reference) - 2
    _equal(model.state_dict(), {k: v for k, v in reference.items() if not k.startswith("head.")}, "backbone.")
    images = torch.randn(2, 3, 32, 32)
    source.reset_classifier(0)
    with torch.no_grad():
        assert torch.allclose(model.eval().encode_image(images), source.eval()(images), atol=1e-6)


def test_a_torchvision_file_fits_resnet18_and_is_refused_by_the_cifar_stem(tmp_path: Path) -> None:
    import torchvision

    source = torchvision.models.resnet18(weights=None)
    # A training script's checkpoint wrapper and DDP's prefix are unwrapped.
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in source.state_dict().items()}},
               tmp_path / "resnet18.pth")
    model = EmbeddingModel(ModelConfig(backbone="resnet18"))
    report = load_initial_weights(model, str(tmp_path / "resnet18.pth"))
    assert report.dropped == ["fc.bias", "fc.weight"] and not report.problems
    _equal(model.state_dict(), {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}, "backbone.")

    cifar = EmbeddingModel(ModelConfig(backbone="resnet18-cifar"))
    before = cifar.backbone.conv1.weight.clone()
    refusal = r"shape differs \(1\): backbone.conv1.weight: \(64, 3, 7, 7\) vs \(64, 3, 3, 3\)"
    with pytest.raises(InitFromError, match=refusal):
        load_initial_weights(cifar, str(tmp_path / "resnet18.pth"))
    assert torch.equal(cifar.backbone.conv1.weight, before)  # refused: nothing loaded
    report = load_initial_weights(cifar, str(tmp_path / "resnet18.pth"), strict=False)
    assert report.mismatched and torch.equal(cifar.backbone.conv1.weight, before)
    assert torch.equal(cifar.backbone.layer4[1].conv2.weight, source.layer4[1].conv2.weight)


def test_a_manyview_model_and_a_checkpoint_initialise_the_objective_and_its_momentum_copy(tmp_path: Path) -> None:
    from trainer.pretrain import main as pretrain

    make_shard(tmp_path / "train-000000.tar", count=16, start=0, seed=1)
    run = tmp_path / "run"
    assert pretrain(["--objective", "byol", "--backbone", "cnn-small", "--output", str(run),
                     "--train-data", str(tmp_path / "train-000000.tar"), "--batch-size", "8", "--max-steps", "2",
                     "--num-workers", "0", "--log-every", "1"]) == 0
    from safetensors.torch import load_file

    saved = load_file(str(run / "model" / "model.safetensors"))
    checkpoint = next((run / "checkpoints").iterdir())
    for source in (run / "model", checkpoint):
        objective = get_objective("byol").build(ObjectiveSpec(backbone="cnn-small", init_from=str(source)))
        assert objective.init_report.layout in ("manyview model", "manyview checkpoint")
        _equal(objective.encoder.state_dict(), saved)
        # BYOL's target network is a copy of the loaded encoder, not of the random one.
        target = {k[len("target_encoder."):]: v for k, v in objective.state_dict().items()
                  if k.startswith("target_encoder.")}
        assert sorted(target) == sorted(saved)
        _equal(target, saved)

    with pytest.raises(InitFromError, match="holds a cnn-small model but this run builds resnet18-cifar"):
        load_initial_weights(EmbeddingModel(ModelConfig(backbone="resnet18-cifar")), str(run / "model"))


def test_an_open_clip_file_fills_both_towers_and_drops_the_logit_scale(tmp_path: Path) -> None:
    import open_clip

    config = {"embed_dim": 32,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "manyview-test-tiny.json").write_text(json.dumps(config))
    open_clip.add_model_config(str(tmp_path / "configs"))
    source = open_clip.create_model("manyview-test-tiny", pretrained=None)
    torch.save(source.state_dict(), tmp_path / "open_clip.pt")
    text = TextConfig(context_length=16, width=32, heads=2, layers=1)
    model = EmbeddingModel(ModelConfig(backbone="open_clip:manyview-test-tiny", text=text))
    report = load_initial_weights(model, str(tmp_path / "open_clip.pt"))
    assert report.layout == "open_clip" and report.dropped == ["logit_scale"] and not report.problems
    images, tokens = torch.randn(2, 3, 32, 32), torch.randint(1, 1000, (2, 16))
    tokens[:, -1] = 49407
    with torch.no_grad():
        assert torch.allclose(model.eval().encode_image(images), source.eval().encode_image(images), atol=1e-5)
        assert torch.allclose(model.encode_text(tokens), source.encode_text(tokens), atol=1e-5)
    # An image-only model takes the visual tower; the file's text tower has no place in it and is refused...
    image_only = EmbeddingModel(ModelConfig(backbone="open_clip:manyview-test-tiny"))
    with pytest.raises(InitFromError, match="not in the model"):
        load_initial_weights(image_only, str(tmp_path / "open_clip.pt"))
    # ...unless asked to load what fits.
    assert load_initial_weights(image_only, str(tmp_path / "open_clip.pt"), strict=False).loaded > 0


def test_parts_the_file_does_not_hold_stay_fresh_and_are_listed(tmp_path: Path) -> None:
    import timm

    source = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    torch.save(source.state_dict(), tmp_path / "resnet10t.pth")
    model = EmbeddingModel(ModelConfig(backbone="timm:resnet10t", image_projection=16,
                                       text=TextConfig(context_length=8, width=32, heads=2, layers=1)))
    report = load_initial_weights(model, str(tmp_path / "resnet10t.pth"))
    assert report.fresh_parts == ["image_projection", "text"] and not report.problems
    assert "freshly initialised (not in the file): image_projection, text" in report.describe()


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "absent.pt", "no such file or directory"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "neither a manyview model"),
    (lambda d: (d / "notes.txt").write_text("hi") and d / "notes.txt", "expected a weights file"),
    (lambda d: torch.save({"epoch": 1}, d / "meta.pt") or d / "meta.pt", "holds no state dict"),
    (lambda d: (d / "junk.pt").write_bytes(b"not a torch file") and d / "junk.pt", "cannot read it"),
])
def test_bad_paths_say_what_is_wrong(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(InitFromError, match=message):
        load_initial_weights(EmbeddingModel(ModelConfig(backbone="cnn-small")), str(make(tmp_path)))


def test_the_command_line_starts_from_the_file_and_refuses_a_wrong_one(tmp_path: Path, caplog) -> None:
    import torchvision
    from safetensors.torch import load_file

    from trainer.pretrain import main as pretrain

    make_shard(tmp_path / "train-000000.tar", count=8, start=0, seed=2)
    source = torchvision.models.resnet18(weights=None)
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    common = ["--objective", "simclr", "--train-data", str(tmp_path / "train-000000.tar"), "--batch-size", "4",
              "--max-steps", "0", "--num-workers", "0", "--init-from", str(tmp_path / "resnet18.pth")]
    assert pretrain(common + ["--backbone", "resnet18", "--output", str(tmp_path / "ok")]) == 0
    saved = load_file(str(tmp_path / "ok" / "model" / "model.safetensors"))
    _equal(saved, {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}, "backbone.")
    card = json.loads((tmp_path / "ok" / "model" / "config.json").read_text())
    assert card["init_from"] == str(tmp_path / "resnet18.pth")

    assert pretrain(common + ["--backbone", "resnet18-cifar", "--output", str(tmp_path / "refused")]) == 2
    assert "--init-strict false" in caplog.text and "backbone.conv1.weight" in caplog.text
    assert pretrain(common + ["--backbone", "resnet18-cifar", "--output", str(tmp_path / "lenient"),
                              "--init-strict", "false"]) == 0


def test_parse_strict() -> None:
    assert parse_strict("false") is False and parse_strict("Yes") is True and parse_strict(True) is True
    with pytest.raises(ValueError, match="true or false"):
        parse_strict("maybe")
