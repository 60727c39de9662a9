"""The ViT pieces the masked-image objectives share (issue 18): ``forward_vit``'s mask tokens and attention mask,
pixel-patch targets, register tokens and the exported pooling (recorded in RUN/model/config.json, exported to
ONNX with the uint8-in-graph contract and parity)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.models import EmbeddingModel, ModelConfig, build_backbone
from trainer.models.embedding import load_model, save_model
from trainer.models.vit import forward_vit, normalise_patches, patchify, unpatchify


def _vit(size: int = 16, **options):
    torch.manual_seed(0)
    return build_backbone("vit-micro-cifar", size, **options).module.eval()


# ---------------------------------------------------------------- forward_vit: mask tokens, attention mask


def test_masked_patches_are_replaced_by_the_mask_token_before_the_position_embedding():
    vit = _vit()  # 16 px, patch 4: a 4 x 4 grid
    images = torch.randn(2, 3, 16, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :4] = True  # the first patch row: pixel rows 0-3
    token = torch.randn(vit.embed_dim)
    out = forward_vit(vit, images, mask=mask, mask_token=token)
    changed = images.clone()
    changed[:, :, :4] = torch.randn(2, 3, 4, 16)  # only masked patches change: nothing downstream sees them
    again = forward_vit(vit, changed, mask=mask, mask_token=token)
    torch.testing.assert_close(out.tokens, again.tokens)
    unmasked = images.clone()
    unmasked[:, :, 12:] = 0.0  # an unmasked patch row changes the output
    assert not torch.allclose(forward_vit(vit, unmasked, mask=mask, mask_token=token).tokens, out.tokens)
    # The replaced embedding is exactly the mask token: with every patch masked, images do not matter, and the
    # position embedding still tells the tokens apart.
    every = torch.ones(2, 16, dtype=torch.bool)
    blank = forward_vit(vit, torch.zeros(2, 3, 16, 16), mask=every, mask_token=token).tokens
    torch.testing.assert_close(forward_vit(vit, images, mask=every, mask_token=token).tokens, blank)
    assert not torch.allclose(blank[0, 1], blank[0, 2])


def test_mask_needs_its_token_and_one_flag_per_patch():
    vit = _vit()
    images = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="mask_token"):
        forward_vit(vit, images, mask=torch.zeros(2, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask must be \[N, L\] = \(2, 16\)"):
        forward_vit(vit, images, mask=torch.zeros(2, 15, dtype=torch.bool), mask_token=torch.zeros(vit.embed_dim))


def test_attention_mask_reaches_every_block():
    vit = _vit()
    images = torch.randn(2, 3, 16, 16)
    tokens = 1 + 16
    causal = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    out = forward_vit(vit, images, attn_mask=causal)
    later = images.clone()
    later[:, :, 8:] = torch.randn(2, 3, 8, 16)  # patches 8-15 (rows 2-3)
    again = forward_vit(vit, later, attn_mask=causal)
    # The class token and patches 0-7 attend only to earlier tokens, through both blocks.
    torch.testing.assert_close(out.tokens[:, :9], again.tokens[:, :9])
    assert not torch.allclose(out.tokens[:, 9:], again.tokens[:, 9:])
    full = forward_vit(vit, images)
    torch.testing.assert_close(forward_vit(vit, images, attn_mask=torch.ones(tokens, tokens, dtype=torch.bool)).tokens,
                               full.tokens)


# ---------------------------------------------------------------- pixel targets


def test_patchify_orders_pixels_row_column_channel_and_inverts():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    patches = patchify(images, 4)
    assert patches.shape == (2, 4, 48)
    # Patch 1 is the top-right 4 x 4 block; its first entries are pixel (0, 4) in channels 0, 1, 2.
    assert patches[0, 1, :3].tolist() == images[0, :, 0, 4].tolist()
    assert patches[1, 2, 3].item() == images[1, 0, 4, 1].item()  # patch 2 = bottom-left; entry 3 = pixel (0, 1), ch 0
    torch.testing.assert_close(unpatchify(patches, 4, 3), images)
    with pytest.raises(ValueError, match="multiple of the patch size 3"):
        patchify(images, 3)


def test_normalise_patches_standardises_each_patch():
    patches = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]]])
    out = normalise_patches(patches)
    spread = (5 / 3 + 1e-6) ** 0.5  # the unbiased variance of 1..4 is 5/3 (MAE's torch.var)
    torch.testing.assert_close(out[0, 0], torch.tensor([-1.5, -0.5, 0.5, 1.5]) / spread)
    torch.testing.assert_close(out[0, 1], torch.zeros(4))  # a flat patch stays finite


# ---------------------------------------------------------------- register tokens and pooling


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_register_tokens_and_pooling(pool: str):
    vit = _vit(16, register_tokens=3, vit_pool=pool)
    images = torch.randn(2, 3, 16, 16)
    out = forward_vit(vit, images)
    assert out.num_prefix_tokens == 4 and out.tokens.shape == (2, 4 + 16, vit.embed_dim)
    expected = out.patches.mean(dim=1) if pool == "avg" else out.prefix[:, 0]
    torch.testing.assert_close(out.features, expected)  # avg: the normed patch tokens only, no class or registers
    torch.testing.assert_close(vit(images), out.features)


def test_vit_options_are_refused_for_other_backbones_and_bad_values():
    with pytest.raises(ValueError, match="apply to ViT backbones.*'cnn-small'"):
        build_backbone("cnn-small", 32, register_tokens=2)
    with pytest.raises(ValueError, match="vit_pool must be one of"):
        build_backbone("vit-micro-cifar", 32, vit_pool="max")
    with pytest.raises(ValueError, match="register_tokens must be >= 0"):
        build_backbone("vit-micro-cifar", 32, register_tokens=-1)


def test_timm_vit_takes_registers_and_pooling():
    backbone = build_backbone("timm:vit_tiny_patch16_224", 32, register_tokens=2, vit_pool="avg")
    assert backbone.module.num_prefix_tokens == 3 and backbone.module.global_pool == "avg"


def test_pooling_and_registers_are_recorded_in_config_json_and_export_with_parity(tmp_path: Path):
    from export.onnx import export_model
    from export.runtime import Encoder

    torch.manual_seed(0)
    model = EmbeddingModel(ModelConfig(backbone="vit-micro-cifar", image_size=16, register_tokens=2, vit_pool="avg"))
    save_model(model.eval(), str(tmp_path / "model"), {"objective": "test"})
    saved = json.loads((tmp_path / "model" / "config.json").read_text())["model"]
    assert saved["register_tokens"] == 2 and saved["vit_pool"] == "avg"
    loaded, _ = load_model(str(tmp_path / "model"))
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images))
    report = export_model(str(tmp_path / "model"), str(tmp_path / "onnx"), uint8_input=True)
    assert report["image"]["max_abs_diff"] <= 1e-4
    pixels = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    encoder = Encoder(tmp_path / "onnx", providers=["CPUExecutionProvider"])
    with torch.no_grad():
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (model.config.mean, model.config.std))
        float_input = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
        expected = torch.nn.functional.normalize(model.encode_image(float_input), dim=1).numpy()
    np.testing.assert_allclose(encoder.encode_images([Image.fromarray(p) for p in pixels]), expected, atol=1e-4)


def test_command_line_sets_registers_and_pooling(tmp_path: Path):
    from onnx_fixtures import make_shard
    from trainer.pretrain import main as pretrain

    make_shard(tmp_path / "train-000000.tar", count=16, start=0, seed=3)
    run = tmp_path / "run"
    status = pretrain(["--objective", "simclr", "--train-data", str(tmp_path / "train-000000.tar"),
                       "--output", str(run), "--backbone", "vit-micro-cifar", "--register-tokens", "2",
                       "--vit-pool", "avg", "--batch-size", "8", "--max-steps", "1", "--num-workers", "0"])
    assert status == 0
    model, config = load_model(str(run / "model"))
    assert config["model"]["register_tokens"] == 2 and config["model"]["vit_pool"] == "avg"
    assert model.backbone.num_prefix_tokens == 3
