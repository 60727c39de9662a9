"""MAE (He et al. 2022) and SimMIM (Xie et al. 2022): their pixel losses, SimMIM's mask-patch generator, MAE's
decoder and sin-cos positions, and both objectives on vit-micro-cifar (patch 4, 16 px: a 4 x 4 patch grid)."""
from __future__ import annotations

import math
import pickle

import pytest
import torch
from PIL import Image

import trainer.objectives.mae  # noqa: F401  (registration)
import trainer.objectives.simmim  # noqa: F401  (registration)
from trainer.data.masking import coarse_masked_count, coarse_random_mask, kept_count
from trainer.data.pipeline import collate
from trainer.losses import masked_pixel_l1, masked_pixel_mse
from trainer.models.vit import normalise_patches, patchify
from trainer.objectives import ObjectiveSpec, get_objective
from trainer.objectives.mae import MAEDecoder, final_tokens, sincos_2d

SIZE = 16  # vit-micro-cifar: patch 4, a 4 x 4 grid
MAE_SMALL = {"decoder_width": 16, "decoder_depth": 1, "decoder_heads": 2}
SIMMIM_SMALL = {"mask_patch_size": 8}  # 2 x 2 ViT patches: a 2 x 2 grid of mask patches, 3 of 4 masked


# ---------------------------------------------------------------- SimMIM's mask generator


def test_coarse_masked_count_rounds_up_as_the_authors():
    assert coarse_masked_count(48, 8, 0.6) == math.ceil(36 * 0.6) == 22  # SimMIM-Swin: 32 px cells, 4 px patches
    assert coarse_masked_count(8, 2, 0.6) == 10  # ceil(16 * 0.6 = 9.6)
    assert coarse_masked_count((10, 1), 1, 0.3) == 3  # 10 * 0.3 = 3.0000000000000004 in floating point
    assert coarse_masked_count(2, 1, 0.01) == 1
    with pytest.raises(ValueError, match=r"mask_ratio must be in \(0, 1\)"):
        coarse_masked_count(8, 2, 1.0)
    with pytest.raises(ValueError, match=r"mask_ratio must be in \(0, 1\)"):
        coarse_masked_count(8, 2, 0.0)
    with pytest.raises(ValueError, match="3 x 3 mask cells do not tile a 8 x 8 patch grid"):
        coarse_masked_count(8, 3, 0.5)


def test_coarse_random_mask_masks_whole_aligned_cells_at_a_fixed_count():
    masks = coarse_random_mask((8, 8), 2, 0.6, torch.Generator().manual_seed(0), count=300)
    assert masks.shape == (300, 64) and masks.dtype == torch.bool
    assert (masks.sum(dim=1) == 10 * 4).all()  # 10 of the 16 cells, 4 patches each
    grids = masks.view(300, 4, 2, 4, 2)  # [draw, cell row, row in cell, cell column, column in cell]
    cells = grids[:, :, 0, :, 0]
    assert (grids == cells[:, :, None, :, None]).all()  # each 2 x 2 cell is all masked or all visible
    assert (cells.float().mean(dim=0) > 0.4).all() and (cells.float().mean(dim=0) < 0.8).all()  # uniform: ~10/16
    assert len({tuple(row.tolist()) for row in masks}) > 250  # independent draws differ
    again = coarse_random_mask((8, 8), 2, 0.6, torch.Generator().manual_seed(0), count=300)
    assert torch.equal(masks, again)  # a pure function of the generator
    rectangular = coarse_random_mask((4, 6), (2, 3), 0.5, torch.Generator().manual_seed(1))
    assert rectangular.shape == (24,) and rectangular.sum() == 2 * 6
    cell_rows = rectangular.view(2, 2, 2, 3)[:, 0, :, 0]
    assert torch.equal(rectangular.view(2, 2, 2, 3), cell_rows[:, None, :, None].expand(2, 2, 2, 3))


def test_coarse_random_mask_with_unit_cells_is_patch_level_random_masking():
    masks = coarse_random_mask(4, 1, 0.6, torch.Generator().manual_seed(2), count=200)
    assert (masks.sum(dim=1) == 10).all()  # ceil(16 * 0.6)
    assert masks.float().mean(dim=0).min() > 0.4  # every patch gets masked


# ---------------------------------------------------------------- losses, by hand


def test_masked_pixel_mse_by_hand():
    predictions = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]], requires_grad=True)  # N = 1, L = 2 patches, P = 2
    targets = torch.tensor([[[0.0, 0.0], [3.0, 1.0]]])
    only_second = masked_pixel_mse(predictions, targets, torch.tensor([[False, True]]))
    torch.testing.assert_close(only_second, torch.tensor((9.0 + 1.0) / 2))  # visible patch 0 is not scored
    both = masked_pixel_mse(predictions, targets, torch.tensor([[1, 1]]))  # 0/1 masks work too
    torch.testing.assert_close(both, torch.tensor(((1.0 + 4.0) / 2 + 5.0) / 2))
    both.backward()
    torch.testing.assert_close(predictions.grad, torch.tensor([[[0.5, 1.0], [-1.5, -0.5]]]))  # 2 (p - t) / 4


def test_masked_pixel_mse_normalised_targets_use_the_unbiased_patch_variance():
    targets = torch.tensor([[[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 9.0]]])  # patch 0: mean 3, deviations -2 -1 0 3
    predictions = torch.zeros(1, 2, 4)
    loss = masked_pixel_mse(predictions, targets, torch.tensor([[True, False]]), normalise_targets=True, eps=0.0)
    # Unbiased variance 14 / 3, so the mean squared normalised target is (14 / 4) / (14 / 3) = 3 / 4.
    torch.testing.assert_close(loss, torch.tensor(0.75))
    expected = torch.tensor([-2.0, -1.0, 0.0, 3.0]) / math.sqrt(14 / 3 + 1e-6)
    torch.testing.assert_close(normalise_patches(targets)[0, 0], expected)
    raw = masked_pixel_mse(predictions, targets, torch.tensor([[True, False]]))
    torch.testing.assert_close(raw, torch.tensor((1 + 4 + 9 + 36) / 4.0))


def test_masked_pixel_l1_equals_the_authors_pixel_space_formula():
    generator = torch.Generator().manual_seed(3)
    images, reconstructions = torch.randn(2, 3, 8, 8, generator=generator), torch.randn(2, 3, 8, 8, generator=generator)
    mask = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 1]], dtype=torch.bool)  # a 2 x 2 grid of 4 px patches
    # SimMIM's loss: the patch mask upsampled to pixels, L1 summed over masked pixels and channels, / pixels / C.
    pixel_mask = mask.view(2, 2, 2).repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).float()
    expected = ((images - reconstructions).abs() * pixel_mask).sum() / pixel_mask.sum() / 3
    got = masked_pixel_l1(patchify(reconstructions, 4), patchify(images, 4), mask)
    torch.testing.assert_close(got, expected)
    by_hand = masked_pixel_l1(torch.tensor([[[1.0, -1.0], [4.0, 4.0]]]), torch.tensor([[[0.0, 0.0], [0.0, 1.0]]]),
                              torch.tensor([[True, False]]))
    torch.testing.assert_close(by_hand, torch.tensor(1.0))


def test_pixel_losses_check_shapes_and_score_in_float32():
    predictions = torch.randn(2, 3, 4).bfloat16().requires_grad_()
    targets = torch.randn(2, 3, 4)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    for loss in (masked_pixel_mse(predictions, targets, mask), masked_pixel_l1(predictions, targets, mask)):
        assert loss.dtype == torch.float32 and loss.dim() == 0
    assert masked_pixel_l1(predictions, targets, torch.zeros(2, 3, dtype=torch.bool)) == 0  # nothing masked
    with pytest.raises(ValueError, match=r"predictions and targets must both be \[N, L, P\]"):
        masked_pixel_mse(predictions, targets[:, :2], mask)
    with pytest.raises(ValueError, match=r"mask must be \[N, L\] = \(2, 3\)"):
        masked_pixel_l1(predictions, targets, mask[:, :2])
    targets.requires_grad_()
    masked_pixel_mse(predictions.float(), targets, mask, normalise_targets=True).backward()
    assert targets.grad is None  # targets are constants


# ---------------------------------------------------------------- MAE's decoder pieces


def test_sincos_2d_by_hand():
    # Width 4: one frequency (1) per half, [sin c, cos c, sin r, cos r] at (row r, column c), raster order.
    table = sincos_2d(4, 2, 3)
    assert table.shape == (6, 4)
    for index in range(6):
        r, c = divmod(index, 3)
        torch.testing.assert_close(table[index], torch.tensor([math.sin(c), math.cos(c), math.sin(r), math.cos(r)]))
    # Width 8: frequencies 1 and 10000^(-1/2) = 0.01 per half.
    row, column = 1, 2
    expected = [math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02),
                math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)]
    torch.testing.assert_close(sincos_2d(8, 3, 3)[row * 3 + column], torch.tensor(expected))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(6, 2, 2)


def test_decoder_unshuffles_visible_tokens_and_fills_mask_tokens():
    torch.manual_seed(0)
    decoder = MAEDecoder(embed_dim=6, grid=(2, 2), num_prefix_tokens=1, patch_pixels=5, width=8, depth=0,
                         heads=2).eval()  # no blocks: every output depends on its own input token only
    tokens = torch.randn(2, 1 + 2, 6)  # class token + 2 visible patches per image
    keep = torch.tensor([[3, 0], [1, 2]])  # kept patches, in the order of the tokens
    out = decoder(tokens, keep)
    assert out.shape == (2, 4, 5)
    position = sincos_2d(8, 2, 2)

    def head(x):
        return decoder.predict(decoder.norm(x))

    for n in range(2):
        for slot, patch in enumerate(keep[n].tolist()):
            torch.testing.assert_close(out[n, patch], head(decoder.embed(tokens[n, 1 + slot]) + position[patch]))
        for patch in set(range(4)) - set(keep[n].tolist()):
            torch.testing.assert_close(out[n, patch], head(decoder.mask_token[0, 0] + position[patch]))
    torch.testing.assert_close(decoder(tokens, keep[0]), decoder(tokens, keep[0].expand(2, -1)))  # a shared keep


def test_final_tokens_applies_a_norm_moved_after_the_pooling():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", img_size=SIZE, patch_size=4, embed_dim=16, depth=1, num_heads=2,
                            num_classes=0, global_pool="avg", fc_norm=True)
    assert isinstance(vit.norm, torch.nn.Identity)
    tokens = torch.randn(2, 5, 16) * 3 + 1
    torch.testing.assert_close(final_tokens(vit, tokens), torch.nn.functional.layer_norm(tokens, (16,), eps=1e-6))
    plain = timm.create_model("vit_tiny_patch16_224", img_size=SIZE, patch_size=4, embed_dim=16, depth=1,
                              num_heads=2, num_classes=0)
    assert final_tokens(plain, tokens) is tokens  # forward_vit's tokens are already normalised


# ---------------------------------------------------------------- the objectives


def _build(key: str, seed: int = 0, backbone: str = "vit-micro-cifar", **options):
    torch.manual_seed(seed)
    small = MAE_SMALL if key == "mae" else SIMMIM_SMALL
    return get_objective(key).build(ObjectiveSpec(backbone=backbone, image_size=SIZE, options={**small, **options}))


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _mae_batch(n: int = 4, seed: int = 5) -> dict:
    generator = torch.Generator().manual_seed(seed + 100)
    return {"image": _images(n, seed), "keep/image": torch.stack([torch.randperm(16, generator=generator)[:4].sort()
                                                                   .values for _ in range(n)])}


def _simmim_batch(n: int = 4, seed: int = 5) -> dict:
    return {"image": _images(n, seed),
            "mask/image": coarse_random_mask(4, 2, 0.6, torch.Generator().manual_seed(seed + 100), count=n)}


def _capture(module: torch.nn.Module) -> list:
    outputs: list = []
    module.register_forward_hook(lambda _module, _inputs, output: outputs.append(output.detach()))
    return outputs


@pytest.mark.parametrize("key,extra", [("mae", ["keep/image"]), ("simmim", ["mask/image"])])
def test_views_are_one_crop_with_its_mask_drawn_in_the_worker(key, extra):
    objective = _build(key)
    views = pickle.loads(pickle.dumps(objective.views()))  # data workers receive it pickled
    batch = collate([views(Image.new("RGB", (24, 20), (10 * i, 200, 30)), None) for i in range(3)])
    assert sorted(batch) == sorted(["image", *extra]) and batch["image"].shape == (3, 3, SIZE, SIZE)
    if key == "mae":
        assert batch["keep/image"].shape == (3, kept_count(4, 0.75)) and batch["keep/image"].dtype == torch.long
    else:
        assert batch["mask/image"].dtype == torch.bool and (batch["mask/image"].sum(dim=1) == 12).all()


def test_each_objective_exports_the_pooling_its_paper_evaluates_with():
    assert _build("mae").encoder.config.vit_pool == "token"
    assert _build("simmim").encoder.config.vit_pool == "avg"
    spec = ObjectiveSpec(backbone="vit-micro-cifar", image_size=SIZE, options=SIMMIM_SMALL, vit_pool="token")
    assert get_objective("simmim").build(spec).encoder.config.vit_pool == "token"  # the user's choice wins


def _by_hand_masked_mse(predictions: torch.Tensor, batch: dict, normalise: bool) -> torch.Tensor:
    """The mean over every image's masked patches (those not in ``keep/image``) of the patch's mean squared error
    against its pixels, standardised with the unbiased variance over its 48 values when ``normalise``."""
    targets = patchify(batch["image"], 4)
    if normalise:
        centred = targets - targets.mean(dim=-1, keepdim=True)
        targets = centred / (centred.pow(2).sum(dim=-1, keepdim=True) / (48 - 1) + 1e-6).sqrt()
    errors = [(predictions[n, patch] - targets[n, patch]).pow(2).mean()
              for n in range(len(targets)) for patch in set(range(16)) - set(batch["keep/image"][n].tolist())]
    assert len(errors) == len(targets) * 12  # 75% of 16 patches per image
    return torch.stack(errors).mean()


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_mae_loss_is_the_mse_of_masked_patches(norm_pix_loss):
    objective = _build("mae", norm_pix_loss=norm_pix_loss)
    predictions = _capture(objective.decoder)
    batch = _mae_batch()
    loss = objective(batch)["loss"]
    assert predictions[0].shape == (4, 16, 48)  # every patch predicted, raster order
    torch.testing.assert_close(loss, _by_hand_masked_mse(predictions[0], batch, norm_pix_loss))


def _masked(batch):
    return torch.ones(4, 16, dtype=torch.bool).scatter_(1, batch["keep/image"], False)


def test_mae_encoder_sees_only_visible_patches():
    objective = _build("mae")
    predictions = _capture(objective.decoder)
    batch = _mae_batch()
    first = objective(batch)["loss"]
    changed = dict(batch, image=batch["image"].clone())
    changed["image"][_masked(batch).view(4, 1, 4, 1, 4, 1).expand(4, 3, 4, 4, 4, 4).reshape(4, 3, SIZE, SIZE)] = 5.0
    second = objective(changed)["loss"]
    torch.testing.assert_close(predictions[1], predictions[0], rtol=0, atol=0)  # masked pixels never reach it
    assert second != first  # ... but they are its targets


def test_mae_initialises_the_encoder_as_the_authors():
    objective = _build("mae")
    vit = objective.encoder.backbone
    assert not vit.pos_embed.requires_grad
    torch.testing.assert_close(vit.pos_embed[0, 0], torch.zeros(64))  # the class token's position
    torch.testing.assert_close(vit.pos_embed[0, 1:], sincos_2d(64, 4, 4))
    # xavier-uniform qkv [192, 64]: std sqrt(6 / 256) / sqrt(3) = 0.088 (timm's init: truncated normal, std 0.02)
    assert all(0.07 < block.attn.qkv.weight.std() < 0.11 for block in vit.blocks)
    groups = objective.parameter_groups(0.05)
    assert not any(p is vit.pos_embed for group in groups for p in group["params"])  # fixed: not optimised
    learned = _build("mae", encoder_init="timm", position_embedding="learned").encoder.backbone
    assert learned.pos_embed.requires_grad and learned.blocks[0].attn.qkv.weight.std() < 0.03
    assert not torch.allclose(learned.pos_embed[0, 1:], sincos_2d(64, 4, 4))


def test_simmim_loss_is_the_l1_of_masked_pixels_and_masked_patches_enter_as_the_mask_token():
    objective = _build("simmim")
    predictions = _capture(objective.head)
    batch = _simmim_batch()
    loss = objective(batch)["loss"]
    mask, images = batch["mask/image"], batch["image"]
    reconstruction = predictions[0].view(4, 4, 4, 4, 4, 3).permute(0, 5, 1, 3, 2, 4).reshape(4, 3, SIZE, SIZE)
    pixel_mask = mask.view(4, 4, 4).repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).float()
    torch.testing.assert_close(loss, ((images - reconstruction).abs() * pixel_mask).sum() / pixel_mask.sum() / 3)
    changed = images.clone()
    changed[pixel_mask.expand(-1, 3, -1, -1).bool()] = 7.0
    objective(dict(batch, image=changed))
    torch.testing.assert_close(predictions[1], predictions[0], rtol=0, atol=0)  # only the mask token got in
    objective(dict(batch, image=images + (1 - pixel_mask)))  # visible pixels do reach the encoder
    assert not torch.allclose(predictions[2], predictions[0])


def test_weight_decay_groups_follow_the_authors():
    simmim = _build("simmim")
    vit = simmim.encoder.backbone
    decay, no_decay = simmim.parameter_groups(0.05)[:2]
    assert any(p is simmim.mask_token for p in decay["params"])  # the authors' ViT variant decays the mask token
    for exempt in (vit.cls_token, vit.pos_embed):  # ... and not these (their no_weight_decay)
        assert any(p is exempt for p in no_decay["params"]) and not any(p is exempt for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(simmim.parameters()))
    mae = _build("mae")
    decay = mae.parameter_groups(0.05)[0]["params"]  # MAE: timm's add_weight_decay, only 1-D and biases exempt
    assert any(p is mae.encoder.backbone.cls_token for p in decay) and any(p is mae.decoder.mask_token for p in decay)


@pytest.mark.parametrize("key", ["mae", "simmim"])
def test_forward_backward_reaches_the_encoder_and_state_round_trips(key):
    objective = _build(key)
    outputs = objective(_mae_batch() if key == "mae" else _simmim_batch())
    assert set(outputs) == {"loss", "embedding_std"} and all(torch.isfinite(v) for v in outputs.values())
    outputs["loss"].backward()
    trained = [p for p in objective.encoder.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    head = objective.decoder if key == "mae" else objective.head
    assert all(p.grad is not None for p in head.parameters())
    if key == "simmim":
        assert objective.mask_token.grad.abs().sum() > 0
    state = objective.state_dict()
    fresh = _build(key, seed=9)
    fresh.load_state_dict(state)
    for name, value in fresh.state_dict().items():
        torch.testing.assert_close(value, state[name], msg=name)


@pytest.mark.parametrize("key", ["mae", "simmim"])
def test_register_tokens_pass_through(key):
    torch.manual_seed(0)
    options = MAE_SMALL if key == "mae" else SIMMIM_SMALL
    objective = get_objective(key).build(ObjectiveSpec(backbone="vit-micro-cifar", image_size=SIZE, options=options,
                                                       register_tokens=2))
    assert objective.encoder.backbone.num_prefix_tokens == 3
    if key == "mae":  # class + 2 registers at zero positions, then the sin-cos grid
        torch.testing.assert_close(objective.encoder.backbone.pos_embed[0, :3], torch.zeros(3, 64))
        assert objective.decoder.position.shape == (1, 3 + 16, 16)
    loss = objective(_mae_batch() if key == "mae" else _simmim_batch())["loss"]
    loss.backward()
    assert torch.isfinite(loss) and objective.encoder.backbone.reg_token.grad.abs().sum() > 0


@pytest.mark.parametrize("key", ["mae", "simmim"])
def test_a_cnn_is_refused_with_a_clear_message(key):
    with pytest.raises(ValueError, match=fr"{key} needs a ViT backbone \(vit-tiny-cifar, vit-small-cifar, "
                                         r"timm:vit_\*\), got cnn-small"):
        _build(key, backbone="cnn-small")


@pytest.mark.parametrize("key,options,match", [
    ("mae", {"mask_ratio": 1.0}, r"mae: mask_ratio must be in \[0, 1\)"),
    ("mae", {"decoder_width": 18, "decoder_heads": 4}, "decoder_width 18 is not divisible by decoder_heads 4"),
    ("mae", {"decoder_width": 6, "decoder_heads": 2}, "decoder_width must be a multiple of 4"),
    ("mae", {"decoder_depth": 0}, "decoder_depth must be >= 1"),
    ("mae", {"norm_pix_loss": "yes"}, "norm_pix_loss must be true or false"),
    ("mae", {"encoder_init": "jax"}, "encoder_init must be one of"),
    ("mae", {"position_embedding": "rope"}, "position_embedding must be one of"),
    ("mae", {"augment": {"jiter": 1}}, "augment"),
    ("simmim", {"mask_ratio": 0.0}, r"simmim: mask_ratio must be in \(0, 1\)"),
    ("simmim", {"mask_patch_size": 6}, "mask_patch_size 6 must be a multiple of the ViT's patch size 4"),
    ("simmim", {"mask_patch_size": 12}, "divide the image size 16"),
    ("simmim", {"mask_patch_size": 0}, "mask_patch_size must be >= 1"),
    ("simmim", {"augment": {"crop": 1}}, "augment"),
])
def test_option_errors_are_clear(key, options, match):
    with pytest.raises(ValueError, match=match):
        _build(key, **options)


@pytest.mark.parametrize("key", ["mae", "simmim"])
def test_the_loss_of_a_batch_is_the_mean_of_its_halves(key):
    """No global-batch quantity: every image masks the same number of patches, so the loss (and its gradient) of
    the batch is the mean of those of its halves, which is what DDP's gradient average over processes computes;
    2 processes on halves train as 1 on the whole without any all-reduce in the objective."""
    objective = _build(key)
    batch = _mae_batch(n=6) if key == "mae" else _simmim_batch(n=6)
    halves = [{name: value[rows] for name, value in batch.items()} for rows in (slice(0, 3), slice(3, 6))]

    def loss_and_gradients(part: dict):
        objective.zero_grad(set_to_none=True)
        loss = objective(part)["loss"]
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in objective.parameters() if p.requires_grad]

    whole, whole_grads = loss_and_gradients(batch)
    (first, first_grads), (second, second_grads) = map(loss_and_gradients, halves)
    torch.testing.assert_close(whole, (first + second) / 2)
    for got, a, b in zip(whole_grads, first_grads, second_grads):
        torch.testing.assert_close(got, (a + b) / 2, rtol=1e-4, atol=1e-6)
