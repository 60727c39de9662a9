"""AIM (El-Nouby et al. 2024): the prefix-causal attention mask and prefix-length draw, causality through the real
ViT, the next-patch loss, and the objective."""
from __future__ import annotations

import pickle

import pytest
import torch
from PIL import Image

import trainer.objectives.aim  # noqa: F401  (registration)
from trainer.data.masking import prefix_causal_attention_mask, random_prefix_length
from trainer.data.pipeline import collate
from trainer.losses.aim import aim_loss, non_prefix_mask
from trainer.models import build_backbone
from trainer.models.vit import forward_vit, normalise_patches, patchify, unpatchify
from trainer.objectives import ObjectiveSpec, get_objective

SIZE = 16  # vit-micro-cifar: patch 4, so a 4 x 4 grid, L = 16
SMALL = {"head_blocks": 1, "head_hidden_dim": 32}


def _objective(**options):
    torch.manual_seed(0)
    return get_objective("aim").build(ObjectiveSpec(backbone="vit-micro-cifar", image_size=SIZE,
                                                    options={**SMALL, **options}))


# ---------------------------------------------------------------- the attention mask and the prefix draw


def test_prefix_causal_mask_entry_by_entry():
    # Tokens: class, then patches p0..p3; prefix S = 2 (p0, p1). 1 = may attend (row: query, column: key).
    expected = [
        [1, 1, 1, 0, 0],  # class: part of the prefix, sees the prefix patches, nothing after
        [1, 1, 1, 0, 0],  # p0: bidirectional within the prefix (sees p1)
        [1, 1, 1, 0, 0],  # p1
        [1, 1, 1, 1, 0],  # p2: the prefix and itself
        [1, 1, 1, 1, 1],  # p3: causal
    ]
    mask = prefix_causal_attention_mask(4, 2, num_prefix_tokens=1)
    assert mask.dtype == torch.bool and mask.tolist() == [[bool(v) for v in row] for row in expected]
    # No class token, S = 1: only p0 is the prefix, so the rest is plain causal.
    assert prefix_causal_attention_mask(3, 1, 0).int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    # S = 0: plain causal over the patches, the class token sees only itself; S = L: full attention (export).
    assert prefix_causal_attention_mask(2, 0, 1).int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    assert prefix_causal_attention_mask(3, 3, 2).all()


def test_prefix_causal_mask_follows_the_rule_for_every_entry_with_registers_and_per_image_lengths():
    patches, prefix_tokens, lengths = 6, 3, torch.tensor([1, 4, 6, 0])
    masks = prefix_causal_attention_mask(patches, lengths, prefix_tokens)
    assert masks.shape == (4, 1, 9, 9)
    for image, length in enumerate(lengths.tolist()):
        def in_prefix(token: int) -> bool:  # class and registers, then the first S patches
            return token < prefix_tokens or token - prefix_tokens < length

        for query in range(9):
            for key in range(9):
                allowed = in_prefix(key) if in_prefix(query) else (in_prefix(key) or key <= query)
                assert masks[image, 0, query, key].item() == allowed, (image, query, key)
        assert torch.equal(masks[image, 0], prefix_causal_attention_mask(patches, length, prefix_tokens))


def test_prefix_causal_mask_refuses_bad_lengths():
    with pytest.raises(ValueError, match=r"in \[0, 4\]"):
        prefix_causal_attention_mask(4, 5)
    with pytest.raises(ValueError, match=r"in \[0, 4\]"):
        prefix_causal_attention_mask(4, torch.tensor([2, -1]))
    with pytest.raises(ValueError, match="int tensor"):
        prefix_causal_attention_mask(4, torch.tensor([1.5]))


def test_prefix_length_is_uniform_over_1_to_L_minus_1_and_a_pure_function_of_the_generator():
    lengths = random_prefix_length(5, torch.Generator().manual_seed(0), count=2000)
    assert lengths.dtype == torch.long and lengths.shape == (2000,)
    counts = torch.bincount(lengths, minlength=5)
    assert counts[0] == 0 and counts[1:].min() > 400 and counts[1:].max() < 600  # 1..4, ~500 each
    assert torch.equal(lengths, random_prefix_length(5, torch.Generator().manual_seed(0), count=2000))
    one = random_prefix_length(16)
    assert one.shape == () and 1 <= one.item() <= 15  # a scalar per sample collates to [N]
    assert random_prefix_length(2, count=10).tolist() == [1] * 10
    with pytest.raises(ValueError, match="L >= 2"):
        random_prefix_length(1)


# ---------------------------------------------------------------- causality through the real ViT


def _with_patches_after(images: torch.Tensor, position: int, seed: int) -> torch.Tensor:
    """``images`` with the pixels of every patch after ``position`` (raster order) replaced by noise."""
    patches = patchify(images, 4).clone()
    generator = torch.Generator().manual_seed(seed)
    patches[:, position + 1:] = torch.randn(patches[:, position + 1:].shape, generator=generator)
    return unpatchify(patches, 4, images.shape[1])


@torch.no_grad()
def test_an_output_does_not_change_when_later_patches_change():
    torch.manual_seed(0)
    vit = build_backbone("vit-micro-cifar", SIZE, register_tokens=2).module.eval()
    prefix_tokens, prefix = vit.num_prefix_tokens, 5
    assert prefix_tokens == 3  # class + 2 registers: all in the prefix
    mask = prefix_causal_attention_mask(16, prefix, prefix_tokens)
    images = torch.randn(2, 3, SIZE, SIZE)
    before = forward_vit(vit, images, attn_mask=mask).tokens
    for position in (prefix - 1, prefix, 9, 14):  # the last prefix patch, and later ones
        changed = forward_vit(vit, _with_patches_after(images, position, position), attn_mask=mask).tokens
        unchanged = prefix_tokens + position + 1  # prefix tokens and patches 0..position
        torch.testing.assert_close(changed[:, :unchanged], before[:, :unchanged], atol=1e-5, rtol=1e-5)
        assert (changed[:, unchanged] - before[:, unchanged]).abs().max() > 1e-3  # the next one does change
    # Inside the prefix attention is bidirectional: patch 0 and the class token see the last prefix patch ...
    changed = forward_vit(vit, _with_patches_after(images, prefix - 2, 7), attn_mask=mask).tokens
    assert (changed[:, :prefix_tokens + 1] - before[:, :prefix_tokens + 1]).abs().max() > 1e-3
    # ... and without the mask (the exported model) every output sees every patch.
    full = forward_vit(vit, images).tokens
    changed = forward_vit(vit, _with_patches_after(images, 14, 8)).tokens
    assert (changed[:, :prefix_tokens + 1] - full[:, :prefix_tokens + 1]).abs().max() > 1e-3


@torch.no_grad()
def test_per_image_prefix_lengths_mask_each_image_on_its_own():
    torch.manual_seed(0)
    vit = build_backbone("vit-micro-cifar", SIZE).module.eval()
    images, lengths = torch.randn(3, 3, SIZE, SIZE), torch.tensor([1, 8, 15])
    batched = forward_vit(vit, images, attn_mask=prefix_causal_attention_mask(16, lengths, 1)).tokens
    for i, length in enumerate(lengths.tolist()):
        alone = forward_vit(vit, images[i:i + 1], attn_mask=prefix_causal_attention_mask(16, length, 1)).tokens
        torch.testing.assert_close(batched[i:i + 1], alone, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- the loss


def test_non_prefix_mask_scores_the_patches_after_the_prefix():
    assert non_prefix_mask(torch.tensor([1, 2, 0]), 3).tolist() == [
        [False, True, True], [False, False, True], [True, True, True]]


def test_aim_loss_hand_worked_with_the_next_patch_shift_and_the_prefix_excluded():
    # Two images of L = 3 patches of 2 pixel values. Output k predicts patch k + 1.
    targets = torch.tensor([[[0., 0.], [1., 2.], [3., 0.]],
                            [[5., 5.], [0., 0.], [2., 2.]]])
    predictions = torch.tensor([[[1., 2.], [3., 2.], [9., 9.]],
                                [[7., 7.], [4., 2.], [0., 0.]]], requires_grad=True)
    scored = non_prefix_mask(torch.tensor([1, 2]), 3)  # image 0: S = 1, patches 1, 2; image 1: S = 2, patch 2
    # Image 0: output 0 vs patch 1: (0 + 0) / 2 = 0; output 1 vs patch 2: (0 + 4) / 2 = 2 -> mean over 2 = 1.
    # Image 1: output 1 vs patch 2: (4 + 0) / 2 = 2 (output 0 vs patch 1, 49 each, is in the prefix) -> 2.
    # The last outputs ([9, 9], [0, 0]) predict nothing. Batch: (1 + 2) / 2 = 1.5.
    loss = aim_loss(predictions, targets, scored)
    assert loss.item() == pytest.approx(1.5)
    loss.backward()
    unused = torch.tensor([[0, 0, 1], [1, 0, 1]], dtype=torch.bool)  # prefix-predicting and last outputs
    assert predictions.grad[unused].abs().sum() == 0 and predictions.grad[~unused].abs().sum() > 0
    # Without the shift (output k against patch k) the value would differ: the test sees the offset.
    unshifted = ((predictions - targets) ** 2).mean(-1)[scored].mean()
    assert unshifted.item() != pytest.approx(1.5)
    # Patch 0 is never scored (nothing precedes it), whatever the mask says; no scored patch contributes 0.
    everything = torch.ones(2, 3, dtype=torch.bool)
    assert aim_loss(predictions, targets, everything).item() == pytest.approx((1.0 + (49.0 + 2.0) / 2) / 2)
    assert aim_loss(predictions, targets, non_prefix_mask(torch.tensor([3, 2]), 3)).item() == pytest.approx(1.0)


def test_aim_loss_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\[N, L, P\]"):
        aim_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="loss_mask"):
        aim_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.ones(2, 4, dtype=torch.bool))


# ---------------------------------------------------------------- the objective


def test_views_give_one_crop_and_a_prefix_length_drawn_in_the_workers():
    objective = _objective()
    views = pickle.loads(pickle.dumps(objective.views()))  # data workers receive it pickled
    image = Image.new("RGB", (40, 40), (120, 30, 200))
    samples = [views(image, None) for _ in range(40)]
    assert set(samples[0]) == {"image", "prefix/image"}
    batch = collate(samples)
    assert batch["image"].shape == (40, 3, SIZE, SIZE) and batch["prefix/image"].shape == (40,)
    assert batch["prefix/image"].min() >= 1 and batch["prefix/image"].max() <= 15
    assert len(set(batch["prefix/image"].tolist())) > 5  # drawn per sample
    assert set(_objective(prefix_attention=False).views()(image, None)) == {"image"}


def test_objective_trains_a_step_and_gradients_reach_the_encoder():
    objective = _objective()
    vit = objective.encoder.backbone
    assert objective.encoder.config.vit_pool == "avg"
    batch = {"image": torch.randn(4, 3, SIZE, SIZE), "prefix/image": torch.tensor([1, 5, 15, 8])}
    out = objective(batch)
    assert torch.isfinite(out["loss"]) and out["prefix_length"].item() == pytest.approx(7.25)
    out["loss"].backward()
    for name, param in (("patch_embed", vit.patch_embed.proj.weight), ("pos_embed", vit.pos_embed),
                        ("cls_token", vit.cls_token), ("last block", vit.blocks[-1].mlp.fc2.weight),
                        ("head", objective.head.layers[0].weight)):
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    groups = objective.parameter_groups(0.05)
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    before = vit.patch_embed.proj.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(before, vit.patch_embed.proj.weight)
    with torch.no_grad():
        assert torch.isfinite(objective(batch)["loss"])


@torch.no_grad()
def test_objective_loss_is_the_aim_loss_of_the_head_on_the_prefix_causal_trunk():
    """The head runs only where a scored patch is predicted; the loss is the same as on every position."""
    objective = _objective().eval()
    images, lengths = torch.randn(3, 3, SIZE, SIZE), torch.tensor([2, 9, 15])
    vit = objective.encoder.backbone
    tokens = forward_vit(vit, images, attn_mask=prefix_causal_attention_mask(16, lengths, 1)).patches
    predictions = objective.head(tokens + objective.head_position)
    expected = aim_loss(predictions, normalise_patches(patchify(images, 4)), non_prefix_mask(lengths, 16))
    loss = objective({"image": images, "prefix/image": lengths})["loss"]
    torch.testing.assert_close(loss, expected)
    # Plain causal (the paper's ablation): S = 0 for every image, every patch after the first scored.
    causal = _objective(prefix_attention=False).eval()
    assert causal({"image": images})["prefix_length"].item() == 0.0


@torch.no_grad()
def test_exported_model_uses_full_attention_and_the_mean_of_the_patch_tokens():
    objective = _objective().eval()
    images = torch.randn(2, 3, SIZE, SIZE)
    expected = forward_vit(objective.encoder.backbone, images).patches.mean(dim=1)
    torch.testing.assert_close(objective.encoder.encode_image(images), expected, atol=1e-5, rtol=1e-5)


def test_the_loss_of_a_batch_is_the_mean_of_its_halves_losses_and_gradients():
    """A mean of per-image terms with no batch-wide quantity: two processes averaging the gradients of their equal
    halves (what distributed data parallel does) train exactly as one process on the whole batch."""
    objective = _objective().eval()
    batch = {"image": torch.randn(4, 3, SIZE, SIZE), "prefix/image": torch.tensor([1, 7, 15, 3])}
    halves = [{name: value[rows] for name, value in batch.items()} for rows in (slice(0, 2), slice(2, 4))]

    def loss_and_gradient(part: dict) -> tuple[torch.Tensor, torch.Tensor]:
        objective.zero_grad()
        loss = objective(part)["loss"]
        loss.backward()
        return loss.detach(), objective.encoder.backbone.patch_embed.proj.weight.grad.clone()

    whole, whole_gradient = loss_and_gradient(batch)
    (first, first_gradient), (second, second_gradient) = (loss_and_gradient(half) for half in halves)
    torch.testing.assert_close(whole, (first + second) / 2)
    torch.testing.assert_close(whole_gradient, (first_gradient + second_gradient) / 2)


def test_state_survives_a_state_dict_round_trip():
    first, second = _objective(), _objective(head_blocks=1)
    torch.manual_seed(1)
    second.head.layers[0].weight.data.normal_()
    second.load_state_dict(first.state_dict())
    batch = {"image": torch.randn(2, 3, SIZE, SIZE), "prefix/image": torch.tensor([3, 11])}
    with torch.no_grad():
        torch.testing.assert_close(first.eval()(batch)["loss"], second.eval()(batch)["loss"])
    assert not any("head_position" in key for key in first.state_dict())  # a fixed function of the grid


def test_a_cnn_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match=r"aim needs a ViT backbone \(vit-tiny-cifar.*got cnn-small"):
        get_objective("aim").build(ObjectiveSpec(backbone="cnn-small", image_size=SIZE))


@pytest.mark.parametrize("options, message", [
    ({"head_blocks": -1}, "head_blocks must be >= 0"),
    ({"head_hidden_dim": 0}, "head_hidden_dim must be >= 1"),
    ({"head_mlp_ratio": 0}, "head_mlp_ratio must be > 0"),
    ({"normalise_targets": "yes"}, "normalise_targets must be true or false"),
    ({"prefix_attention": 1}, "prefix_attention must be true or false"),
    ({"augment": {"colour": 1}}, "augment"),
    ({"prefix_length": 3}, "unknown option"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        get_objective("aim").build(ObjectiveSpec(backbone="vit-micro-cifar", image_size=SIZE, options=options))


def test_an_image_of_one_patch_is_refused():
    with pytest.raises(ValueError, match="no next patch"):
        get_objective("aim").build(ObjectiveSpec(backbone="vit-micro-cifar", image_size=4, options=SMALL))
