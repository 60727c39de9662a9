"""iBOT (Zhou et al. 2022) and DINOv2 (Oquab et al. 2023): block-wise masks, the masked patch loss, DINO against
given teacher distributions, DINOv2's Sinkhorn-Knopp teacher, and the two objectives."""
from __future__ import annotations

import math
import pickle
import threading
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from distributed_helpers import assert_two_processes_match_one
from PIL import Image

import trainer.objectives.dinov2  # noqa: F401  (registration)
import trainer.objectives.ibot  # noqa: F401  (registration)
from trainer.data.masking import WithKeepIndices, blockwise_mask
from trainer.data.views import AugmentConfig, OneView
from trainer.losses.clustering import sinkhorn
from trainer.losses.dino import dino_loss
from trainer.losses.ibot import dino_loss_from_probabilities, ibot_patch_loss, sinkhorn_teacher
from trainer.losses.koleo import koleo
from trainer.models.vit import forward_vit
from trainer.objectives import ObjectiveSpec, get_objective
from trainer.objectives.momentum import momentum_at

SIZE, LOCAL = 16, 8  # vit-micro-cifar: patch 4, so a 4 x 4 grid and 2 x 2 local crops
SMALL = {"out_dim": 24, "patch_out_dim": 20, "hidden_dim": 32, "bottleneck_dim": 16, "num_local_crops": 2,
         "local_crop_size": LOCAL, "freeze_last_layer_steps": 2, "warmup_teacher_temperature_steps": 4,
         "min_mask_block": 1}


# ---------------------------------------------------------------- block-wise masks


def test_blockwise_masks_have_fixed_shape_and_stay_within_the_target():
    generator = torch.Generator().manual_seed(0)
    masks = blockwise_mask((8, 8), 0.4, 1.0, 4, generator=generator, count=200)
    assert masks.shape == (200, 64) and masks.dtype == torch.bool
    counts = masks.sum(dim=1)
    assert counts.max() <= int(0.4 * 64)  # never more than int(r * L)
    assert counts.float().mean() > 0.8 * 25  # and close to it: BEiT stops short only after 10 failed attempts
    assert blockwise_mask(8, 0.4).shape == (64,)
    again = blockwise_mask((8, 8), 0.4, 1.0, 4, generator=torch.Generator().manual_seed(0), count=200)
    assert torch.equal(masks, again)  # a pure function of the generator
    assert not blockwise_mask(8, 0.0, count=5).any()


def test_blockwise_mask_probability_and_ratio_range():
    masks = blockwise_mask(8, (0.1, 0.5), 0.5, 4, generator=torch.Generator().manual_seed(1), count=600)
    counts = masks.sum(dim=1)
    assert 0.42 < (counts > 0).float().mean() < 0.58  # half the crops masked (iBOT / DINOv2: 0.5)
    masked = counts[counts > 0]
    assert masked.max() <= 32 and masked.min() <= 10 and masked.max() >= 28  # r spread over U(0.1, 0.5)
    assert not blockwise_mask(8, (0.1, 0.5), 0.0, count=20).any()


def test_blockwise_mask_geometry():
    generator = torch.Generator().manual_seed(2)
    # target int(0.07 * 64) = 4 with blocks of exactly 4 square patches: one 2 x 2 block, anywhere.
    masks = blockwise_mask(8, 0.07, 1.0, 4, 4, (1.0, 1.0), generator, count=1000)
    corners = set()
    for mask in masks.view(-1, 8, 8):
        rows, columns = mask.nonzero().unbind(1)
        top, left = int(rows.min()), int(columns.min())
        assert mask.sum() == 4 and mask[top:top + 2, left:left + 2].all()
        corners.add((top, left))
    assert corners == {(t, c) for t in range(7) for c in range(7)}
    # A block never spans the grid (BEiT's strict bound): 4 x 4 squares do not fit a 4 x 4 grid.
    assert not blockwise_mask(4, 0.99, 1.0, 16, 16, (1.0, 1.0), generator, count=10).any()
    # Wide blocks only (aspect = height / width = 0.3, area 3): one row of 3 patches.
    wide = blockwise_mask(8, 0.05, 1.0, 3, 3, (0.3, 0.3), generator, count=50).view(-1, 8, 8)  # 1 x 3 blocks
    for mask in wide:
        rows, columns = mask.nonzero().unbind(1)
        assert mask.sum() == 3 and rows.unique().numel() == 1 and int(columns.max() - columns.min()) == 2


def test_blockwise_mask_errors_and_workers():
    for kwargs, match in [({"mask_ratio": 1.0}, "mask_ratio"), ({"mask_ratio": (0.5, 0.1)}, "mask_ratio"),
                          ({"mask_ratio": 0.3, "mask_probability": 1.5}, "mask_probability"),
                          ({"mask_ratio": 0.3, "min_block_patches": 0}, "min_block_patches"),
                          ({"mask_ratio": 0.3, "min_block_patches": 5, "max_block_patches": 4}, "min_block_patches"),
                          ({"mask_ratio": 0.3, "aspect_ratio": (2.0, 1.0)}, "aspect_ratio")]:
        with pytest.raises(ValueError, match=match):
            blockwise_mask(4, **kwargs)
    recipe = WithKeepIndices(OneView(SIZE, [0.5] * 3, [0.25] * 3, AugmentConfig()),
                             {"image": partial(blockwise_mask, (4, 4), (0.1, 0.5), 0.5, 1)}, key_prefix="mask")
    out = pickle.loads(pickle.dumps(recipe))(Image.new("RGB", (20, 20)), None)  # data workers get it pickled
    assert out["mask/image"].shape == (16,) and out["mask/image"].dtype == torch.bool


# ---------------------------------------------------------------- losses, by hand


def test_ibot_patch_loss_by_hand_averages_per_image_then_over_images():
    ln2, ln3 = math.log(2), math.log(3)
    # Image 0 masks patch 0; image 1 masks patches 0 and 2; image 2 masks nothing (adds 0, still counts).
    mask = torch.tensor([[True, False, False], [True, False, True], [False, False, False]])
    student = torch.tensor([[0.0, 0.0], [ln3, 0.0], [0.0, ln3]])  # softmax [1/2, 1/2], [3/4, 1/4], [1/4, 3/4]
    teacher = torch.tensor([[1.0, 0.0], [0.5, 0.5], [1.0, 0.0]])
    ce = [ln2, -0.5 * math.log(0.75) - 0.5 * math.log(0.25), -math.log(0.25)]  # ln 2, 2 ln 2 - ln3 / 2, 2 ln 2
    assert ce[1] == pytest.approx(2 * ln2 - 0.5 * ln3)
    expected = (ce[0] + (ce[1] + ce[2]) / 2 + 0.0) / 3
    assert ibot_patch_loss(student, teacher, mask, 1.0).item() == pytest.approx(expected, rel=1e-6)
    scaled = ibot_patch_loss(0.1 * student, teacher, mask, 0.1)  # tau_s divides the student's logits
    assert scaled.item() == pytest.approx(expected, rel=1e-6)
    student = student.clone().requires_grad_()
    teacher = teacher.clone().requires_grad_()
    ibot_patch_loss(student, teacher, mask).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None  # targets take no gradient
    empty = torch.zeros(0, 2, requires_grad=True)
    nothing = ibot_patch_loss(empty, torch.zeros(0, 2), torch.zeros(2, 3, dtype=torch.bool))
    assert nothing.item() == 0.0 and nothing.requires_grad
    with pytest.raises(ValueError, match="M = 3 masked patches"):
        ibot_patch_loss(torch.zeros(2, 2), torch.zeros(2, 2), mask)
    with pytest.raises(ValueError, match="bool mask"):
        ibot_patch_loss(torch.zeros(3, 2), torch.zeros(3, 2), mask.long())


def test_dino_loss_from_probabilities_by_hand():
    # Teacher distributions [3/4, 1/4] and [1/2, 1/2]; the pairs as in DINO's hand example (test_swav_dino).
    ln2, ln3 = math.log(2), math.log(3)
    student = torch.tensor([[[0.0, 0.0]], [[ln3, 0.0]], [[0.0, ln3]]])
    teacher = torch.tensor([[[0.75, 0.25]], [[0.5, 0.5]]])
    expected = ((2 * ln2 - 0.75 * ln3) + (2 * ln2 - 0.25 * ln3) + ln2 + (2 * ln2 - 0.5 * ln3)) / 4
    assert dino_loss_from_probabilities(student, teacher, 1.0).item() == pytest.approx(expected, rel=1e-6)
    logits, center = torch.randn(2, 3, 5), torch.randn(5)  # = dino_loss on the teacher's centred softmax
    student = torch.randn(4, 3, 5)
    torch.testing.assert_close(dino_loss_from_probabilities(student, F.softmax((logits - center) / 0.04, dim=2), 0.1),
                               dino_loss(student, logits, center, 0.1, 0.04), rtol=1e-5, atol=1e-6)
    one_hot = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # exact zeros stay finite
    value = dino_loss_from_probabilities(torch.tensor([[[0.0, 0.0]], [[0.0, 0.0]]]), one_hot, 1.0)
    assert value.item() == pytest.approx(ln2, rel=1e-6)


def _authors_sinkhorn_knopp_teacher(logits: torch.Tensor, temperature: float, iterations: int) -> torch.Tensor:
    """DINOv2's ``sinkhorn_knopp_teacher`` on one process, transcribed (prototypes x samples)."""
    q = torch.exp(logits.double() / temperature).t()
    samples, prototypes = q.shape[1], q.shape[0]
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= samples
    return (q * samples).t().float()


def test_sinkhorn_teacher_by_hand_and_as_the_authors():
    # exp(logits / T) = [[3, 1], [1, 1]] at T = 0.5; one round gives rows [.6, .4] and [1/3, 2/3].
    logits = 0.5 * torch.log(torch.tensor([[3.0, 1.0], [1.0, 1.0]]))
    torch.testing.assert_close(sinkhorn_teacher(logits, 0.5, 1), torch.tensor([[0.6, 0.4], [1 / 3, 2 / 3]]))
    logits = torch.randn(9, 6, generator=torch.Generator().manual_seed(3))
    got = sinkhorn_teacher(logits, 0.07, 3)
    torch.testing.assert_close(got, _authors_sinkhorn_knopp_teacher(logits, 0.07, 3), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(9))
    assert sinkhorn_teacher(torch.zeros(0, 6), 0.07).shape == (0, 6)


def _sinkhorn_in_two_parts(parts: list[torch.Tensor], total: int) -> list[torch.Tensor]:
    """Two threads stand in for two processes, each holding one part; their reductions meet at a barrier."""
    slots, out, barrier = [None, None], [None, None], threading.Barrier(2)

    def collective(part, op):
        def reduce(tensor):
            slots[part] = tensor.clone()
            barrier.wait()
            result = op(slots[0], slots[1])
            barrier.wait()
            return result
        return reduce

    def run(part):
        out[part] = sinkhorn_teacher(parts[part], 0.1, 3, collective(part, torch.add), collective(part, torch.maximum),
                                     total)

    threads = [threading.Thread(target=run, args=(part,)) for part in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    return out


def test_sinkhorn_teacher_over_parts_with_an_empty_part_equals_the_whole():
    """A process whose crops have no masked patch still runs every reduction, adding nothing to them."""
    logits = torch.randn(7, 5, generator=torch.Generator().manual_seed(4))
    whole = sinkhorn_teacher(logits, 0.1, 3)
    first, second = _sinkhorn_in_two_parts([logits, logits[:0]], 7)
    torch.testing.assert_close(first, whole, rtol=1e-5, atol=1e-6)
    assert second.shape == (0, 5)
    first, second = _sinkhorn_in_two_parts([logits[:3], logits[3:]], 7)
    torch.testing.assert_close(torch.cat([first, second]), whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(whole, sinkhorn(logits, 0.1, 3))  # SwAV's Sinkhorn at epsilon = T


# ---------------------------------------------------------------- the objectives


def _build(key: str = "ibot", seed: int = 0, register_tokens: int = 0, backbone: str = "vit-micro-cifar", **options):
    torch.manual_seed(seed)
    spec = ObjectiveSpec(backbone=backbone, image_size=SIZE, options={**SMALL, **options},
                         register_tokens=register_tokens)
    return get_objective(key).build(spec)


def _batch(n: int = 4, seed: int = 5, unmasked_rows: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    batch = {f"global{i}": torch.randn(n, 3, SIZE, SIZE, generator=generator) for i in range(2)}
    batch.update({f"local{i}": torch.randn(n, 3, LOCAL, LOCAL, generator=generator) for i in range(2)})
    for i in range(2):
        masks = blockwise_mask(4, (0.2, 0.5), 1.0, 1, generator=generator, count=n)
        masks[:unmasked_rows] = False
        batch[f"mask/global{i}"] = masks
    return batch


@pytest.mark.parametrize("key", ["ibot", "dinov2"])
def test_views_are_multicrop_with_block_masks_on_the_global_crops(key):
    objective = _build(key)
    recipe = pickle.loads(pickle.dumps(objective.views()))
    out = recipe(Image.new("RGB", (40, 40), (120, 30, 200)), None)
    assert sorted(out) == ["global0", "global1", "local0", "local1", "mask/global0", "mask/global1"]
    assert out["global0"].shape == (3, SIZE, SIZE) and out["local0"].shape == (3, LOCAL, LOCAL)
    assert out["mask/global1"].shape == (16,) and out["mask/global1"].dtype == torch.bool


@pytest.mark.parametrize("key,register_tokens", [("ibot", 0), ("dinov2", 0), ("dinov2", 2)])
def test_forward_backward_reaches_the_encoder_and_the_mask_token(key, register_tokens):
    objective = _build(key, register_tokens=register_tokens)
    outputs = objective(_batch())
    assert {"loss", "dino_loss", "ibot_loss", "masked_fraction", "teacher_entropy"} <= set(outputs)
    assert all(torch.isfinite(value) for value in outputs.values())
    extra = outputs.get("koleo", torch.tensor(0.0))
    torch.testing.assert_close(outputs["loss"], outputs["dino_loss"] + outputs["ibot_loss"] + extra)
    outputs["loss"].backward()
    heads = [objective.encoder, objective.head] + ([] if objective.options.shared_head else [objective.patch_head])
    for module in heads:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert objective.mask_token.grad.abs().sum() > 0
    teachers = [objective.teacher_encoder, objective.teacher_head] + (
        [] if objective.options.shared_head else [objective.teacher_patch_head])
    assert all(p.grad is None for module in teachers for p in module.parameters())
    assert (key == "dinov2") == hasattr(objective, "patch_head")  # iBOT shares one head, DINOv2 unties them


def test_unmasked_crops_give_no_patch_loss_and_no_mask_token_gradient():
    objective = _build()
    batch = _batch(unmasked_rows=4)
    outputs = objective(batch)
    assert outputs["ibot_loss"].item() == 0.0 and outputs["masked_fraction"].item() == 0.0
    outputs["loss"].backward()
    assert objective.mask_token.grad.abs().sum() == 0


def test_ibot_centres_are_emas_of_teacher_means_over_all_patches_and_class_tokens():
    objective = _build(center_momentum=0.9, patch_center_momentum=0.8)
    batch = _batch()
    objective(batch)
    with torch.no_grad():  # the teacher by hand: unmasked global crops, its head on every patch
        vit = objective.teacher_encoder.backbone
        out = forward_vit(vit, torch.cat([batch["global0"], batch["global1"]]))
        class_mean = objective.teacher_head(out.prefix[:, 0]).mean(dim=0)
        patch_mean = objective.teacher_head(out.patches).mean(dim=(0, 1))
    objective.after_step(0, 10)
    torch.testing.assert_close(objective.center, 0.1 * class_mean, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(objective.patch_center, 0.2 * patch_mean, rtol=1e-4, atol=1e-6)
    assert int(objective.steps_done) == 1


def test_patch_temperature_warms_up_with_the_step_clock():
    objective = _build(warmup_teacher_patch_temperature=0.02, teacher_patch_temperature=0.06)
    assert objective.teacher_patch_temperature() == pytest.approx(0.02)
    objective.steps_done.fill_(2)  # half of the 4 warm-up steps
    assert objective.teacher_patch_temperature() == pytest.approx(0.04)
    objective.steps_done.fill_(9)
    assert objective.teacher_patch_temperature() == pytest.approx(0.06)


def test_patch_centre_over_masked_patches_only():
    """``patch_center: masked`` (lightly's IBOTPatchLoss): the same loss while the centre is zero, the teacher's
    patch head on the masked patches only, the centre moved towards their mean; no masked patch: no move."""
    batch = _batch()
    every = _build("ibot")
    masked = _build("ibot", patch_center="masked")
    torch.testing.assert_close(masked(batch)["loss"], every(batch)["loss"])
    mask = torch.cat([batch["mask/global0"], batch["mask/global1"]])
    with torch.no_grad():
        out = forward_vit(masked.teacher_encoder.backbone, torch.cat([batch["global0"], batch["global1"]]))
        logits = masked.teacher_head(out.patches[mask])
    torch.testing.assert_close(masked._batch_patch_center, logits.mean(dim=0), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(every._batch_patch_center, masked._batch_patch_center)  # all patches' mean differs
    masked.after_step(0, 10)
    torch.testing.assert_close(masked.patch_center, 0.1 * logits.mean(dim=0), rtol=1e-5, atol=1e-6)  # momentum 0.9
    unmasked = _build("ibot", patch_center="masked")
    unmasked(_batch(unmasked_rows=4))
    unmasked.after_step(0, 10)
    assert not unmasked.patch_center.any()
    with pytest.raises(ValueError, match="patch_center must be 'all' or 'masked'"):
        _build("ibot", patch_center="some")


def test_dinov2_targets_are_sinkhorn_knopp_and_its_centres_stay_unused():
    objective = _build("dinov2")
    batch = _batch()
    objective(batch)
    with torch.no_grad():
        vit = objective.teacher_encoder.backbone
        out = forward_vit(vit, torch.cat([batch["global0"], batch["global1"]]))
        logits = objective.teacher_head(out.prefix[:, 0])
    targets = objective._class_targets(logits)
    torch.testing.assert_close(targets, _authors_sinkhorn_knopp_teacher(logits, 0.04, 3), rtol=1e-5, atol=1e-6)
    objective.after_step(0, 10)
    assert not objective.center.any() and not objective.patch_center.any()


def test_dinov2_with_ema_centring_and_no_koleo_is_ibot_with_untied_heads():
    """What DINOv2 adds is Sinkhorn-Knopp and KoLeo: without them the loss is iBOT's with separate heads."""
    common = {"shared_head": False, "min_mask_block": 1, "max_mask_block_ratio": 1.0, "momentum": 0.99}
    batch = _batch()
    ibot = _build("ibot", **common)(batch)
    dinov2 = _build("dinov2", centering="centering", koleo_loss_weight=0.0, **common)(batch)
    torch.testing.assert_close(dinov2["loss"], ibot["loss"])
    assert "koleo" not in dinov2


def test_dinov2_koleo_is_on_each_global_crops_student_class_tokens():
    objective = _build("dinov2", koleo_loss_weight=0.5)
    batch = _batch()
    outputs = objective(batch)
    with torch.no_grad():  # the student by hand: masked global crops through the encoder, class tokens
        vit = objective.encoder.backbone
        tokens = [forward_vit(vit, batch[f"global{i}"], mask=batch[f"mask/global{i}"],
                              mask_token=objective.mask_token).prefix[:, 0] for i in range(2)]
    expected = 0.5 * (koleo(tokens[0]) + koleo(tokens[1]))
    torch.testing.assert_close(outputs["koleo"], expected, rtol=1e-5, atol=1e-6)


def test_untied_patch_head_follows_the_teacher_schedule_and_the_frozen_last_layer():
    objective = _build("dinov2")
    objective(_batch())["loss"].backward()
    objective.before_optimizer_step(1, 10)  # within the 2 frozen steps
    assert all(p.grad is None for p in objective.patch_head.last_layer.parameters())
    assert all(p.grad is None for p in objective.head.last_layer.parameters())
    with torch.no_grad():
        for p in objective.patch_head.parameters():
            p.add_(0.1)
    online = next(objective.patch_head.parameters()).detach().clone()
    before = next(objective.teacher_patch_head.parameters()).detach().clone()
    objective.after_step(3, 10)
    m = momentum_at(3, 10, 0.992)
    torch.testing.assert_close(next(objective.teacher_patch_head.parameters()), m * before + (1 - m) * online)


@pytest.mark.parametrize("key", ["ibot", "dinov2"])
def test_state_survives_a_state_dict_round_trip(key):
    objective = _build(key, centering="centering") if key == "dinov2" else _build(key)
    objective(_batch())
    objective.after_step(0, 10)
    with torch.no_grad():
        objective.mask_token.add_(1.0)
    fresh = _build(key, seed=9)
    fresh.load_state_dict(objective.state_dict())
    for name in ("center", "patch_center", "steps_done", "mask_token"):
        torch.testing.assert_close(getattr(fresh, name), getattr(objective, name))
    assert objective.patch_center.any() and int(fresh.steps_done) == 1


def test_a_cnn_is_refused_with_the_list_of_vits():
    with pytest.raises(ValueError, match=r"ibot needs a ViT backbone \(vit-tiny-cifar, vit-small-cifar, timm:vit_\*\)"):
        _build("ibot", backbone="cnn-small")


@pytest.mark.parametrize("key,options,match", [
    ("ibot", {"out_dim": 1}, "ibot: out_dim must be >= 2"),
    ("ibot", {"teacher_patch_temperature": 0}, "ibot: teacher_patch_temperature must be > 0"),
    ("ibot", {"patch_center_momentum": 1.0}, r"ibot: patch_center_momentum must be in \[0, 1\)"),
    ("ibot", {"mask_ratio": [0.5, 0.1]}, "ibot: mask_ratio must be"),
    ("ibot", {"mask_ratio": 0.3}, "ibot: mask_ratio must be a pair"),
    ("ibot", {"mask_probability": 2}, r"ibot: mask_probability must be in \[0, 1\]"),
    ("ibot", {"min_mask_block": 0}, "ibot: min_mask_block must be None or >= 1"),
    ("ibot", {"max_mask_block_ratio": 0}, "ibot: max_mask_block_ratio"),
    ("ibot", {"mask_aspect_ratio": [3, 1]}, "ibot: mask_aspect_ratio"),
    ("ibot", {"ibot_loss_weight": -1}, "ibot: ibot_loss_weight must be >= 0"),
    ("ibot", {"use_bn_in_head": True}, "ibot: use_bn_in_head is not supported"),
    ("ibot", {"momentum": 1.1}, "ibot: need 0 <= momentum"),
    ("ibot", {"local_crop_size": 6}, "ibot: local_crop_size: image size 6 is not a multiple"),
    ("ibot", {"local_crop_size": 32}, "ibot: local_crop_size 32 is larger"),
    ("dinov2", {"centering": "mean"}, "dinov2: centering must be one of sinkhorn_knopp, centering"),
    ("dinov2", {"sinkhorn_iterations": 0}, "dinov2: sinkhorn_iterations must be >= 1"),
    ("dinov2", {"koleo_loss_weight": -0.1}, "dinov2: koleo_loss_weight must be >= 0"),
])
def test_bad_options_are_refused_clearly(key, options, match):
    with pytest.raises(ValueError, match=match):
        _build(key, **options)


def _build_ibot_for_processes():
    return _build("ibot")


def _build_ibot_masked_centre_for_processes():
    return _build("ibot", patch_center="masked")


def _build_dinov2_for_processes():
    return _build("dinov2", koleo_loss_weight=0.5)


def _batch_for_processes(step: int = 0) -> dict:
    # Rows 0-3 (the first process's half) have no masked patch on the second step: the Sinkhorn over masked
    # patches then runs with an empty part on one process.
    return _batch(n=8, seed=31 + step, unmasked_rows=4 * step)


@pytest.mark.parametrize("build", [_build_ibot_for_processes, _build_ibot_masked_centre_for_processes,
                                   _build_dinov2_for_processes])
def test_two_processes_equal_one_process(build, tmp_path):
    """Centres from all-reduced sums, Sinkhorn's all-reduced sums and count, KoLeo over the gathered class tokens
    and global-batch means of both losses: 2 processes on halves give the loss and gradients of 1 process on the
    whole batch; two steps, so the second uses the updated centres and teacher."""
    assert_two_processes_match_one(build, _batch_for_processes, tmp_path, steps=2)
