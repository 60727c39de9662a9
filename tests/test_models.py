"""Backbone registry and the saved model directory."""
import pytest
import torch

from trainer.models import EmbeddingModel, ModelConfig, TextConfig, build_backbone, load_model, save_model


@pytest.mark.parametrize("name,dim", [("cnn-small", 256), ("resnet18-cifar", 512), ("timm:test_resnet", None)])
def test_backbones_build_and_report_their_width(name, dim):
    backbone = build_backbone(name, 32)
    out = backbone.module.eval()(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, backbone.feature_dim)
    if dim is not None:
        assert backbone.feature_dim == dim


def test_resnet18_cifar_keeps_resolution_in_the_stem():
    module = build_backbone("resnet18-cifar").module
    assert module.conv1.kernel_size == (3, 3) and module.conv1.stride == (1, 1)
    assert isinstance(module.maxpool, torch.nn.Identity)


def test_unknown_backbone_names_the_known_ones():
    with pytest.raises(KeyError, match="resnet18-cifar"):
        build_backbone("vgg-nope")


def test_save_load_round_trip_with_text_tower(tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(backbone="cnn-small", image_projection=32, text=TextConfig(context_length=8, width=32, heads=2, layers=1))
    model = EmbeddingModel(config).eval()
    save_model(model, str(tmp_path / "model"), {"objective": "clip", "steps": 3})
    loaded, saved = load_model(str(tmp_path / "model"))
    images, tokens = torch.randn(3, 3, 32, 32), torch.randint(0, 1000, (3, 8))
    with torch.no_grad():
        assert torch.allclose(model.encode_image(images), loaded.encode_image(images))
        assert torch.allclose(model.encode_text(tokens), loaded.encode_text(tokens))
    assert saved["objective"] == "clip" and saved["embed_dim"] == 32 and saved["has_text"]


def test_load_model_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(str(tmp_path / "empty"))


def test_saved_weights_are_an_ordinary_file_that_carries_the_model_card(tmp_path):
    import json
    import os
    import stat

    from safetensors import safe_open

    previous = os.umask(0o022)
    try:
        save_model(EmbeddingModel(ModelConfig(backbone="cnn-small")), str(tmp_path / "model"),
                   {"objective": "simclr", "steps": 3})
    finally:
        os.umask(previous)
    weights = tmp_path / "model" / "model.safetensors"
    assert stat.S_IMODE(os.stat(weights).st_mode) == 0o644  # safetensors alone writes 0600
    with safe_open(str(weights), "pt") as handle:
        metadata = handle.metadata()
    card = json.loads(metadata["model_card"])
    assert card["objective"] == "simclr" and card["steps"] == 3 and card["model"]["backbone"] == "cnn-small"
    assert card == json.loads((tmp_path / "model" / "config.json").read_text())
