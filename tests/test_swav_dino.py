"""SwAV and DINO: Sinkhorn and both losses against hand-worked numbers, the multi-crop recipe, prototype and
last-layer freezing, the queue, the centre, checkpoints, two processes against one, ViT backbones, and short
learning runs on CIFAR-10."""
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import trainer.objectives.dino  # noqa: F401  (registration)
import trainer.objectives.swav  # noqa: F401
from distributed_helpers import assert_two_processes_match_one
from trainer.data.multicrop import MultiCropViews, accepted_local_size
from trainer.losses.clustering import sinkhorn, swav_loss
from trainer.losses.dino import dino_loss, teacher_temperature_at
from trainer.objectives import ObjectiveSpec, get_objective
from trainer.objectives.momentum import momentum_at

SIZE, LOCAL = 16, 8
SMALL = {
    "swav": {"projection_dim": 16, "projection_hidden_dim": 32, "num_prototypes": 12, "num_local_crops": 2,
             "local_crop_size": LOCAL, "freeze_prototypes_steps": 2},
    "dino": {"out_dim": 24, "hidden_dim": 32, "bottleneck_dim": 16, "num_local_crops": 2, "local_crop_size": LOCAL,
             "freeze_last_layer_steps": 2, "warmup_teacher_temperature_steps": 4},
}


def _build(key: str, seed: int = 0, backbone: str = "cnn-small", size: int = SIZE, **options):
    torch.manual_seed(seed)
    spec = ObjectiveSpec(backbone=backbone, image_size=size, options={**SMALL[key], **options})
    return get_objective(key).build(spec)


def _crops(n: int = 8, seed: int = 1, step: int = 0, local: int = 2) -> dict:
    generator = torch.Generator().manual_seed(seed + 100 * step)
    batch = {f"global{i}": torch.randn(n, 3, SIZE, SIZE, generator=generator) for i in range(2)}
    batch.update({f"local{i}": torch.randn(n, 3, LOCAL, LOCAL, generator=generator) for i in range(local)})
    return batch


def _perturb(module) -> None:  # stands in for an optimizer step
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))


# ---------------------------------------------------------------- losses and schedules, by hand


def test_sinkhorn_matches_a_hand_worked_example():
    # exp(scores / eps) = P = [[3, 1], [1, 1]] with eps = 0.5. One round: prototype columns -> 1/K each
    # ([[.375, .25], [.125, .25]]), then samples -> rows [.6, .4] and [1/3, 2/3]. A second round gives
    # columns [9/28, 5/28] and [3/16, 5/16], rows [12/19, 7/19] and [4/11, 7/11].
    scores = 0.5 * torch.log(torch.tensor([[3.0, 1.0], [1.0, 1.0]]))
    one = sinkhorn(scores, epsilon=0.5, iterations=1)
    assert torch.allclose(one, torch.tensor([[0.6, 0.4], [1 / 3, 2 / 3]]), atol=1e-6)
    two = sinkhorn(scores, epsilon=0.5, iterations=2)
    assert torch.allclose(two, torch.tensor([[12 / 19, 7 / 19], [4 / 11, 7 / 11]]), atol=1e-6)
    assert torch.allclose(sinkhorn(scores + 100.0, epsilon=0.5, iterations=2), two, atol=1e-6)  # shift-invariant


def test_sinkhorn_rows_sum_to_one_and_prototype_marginals_become_uniform():
    generator = torch.Generator().manual_seed(0)
    scores = F.normalize(torch.randn(64, 16, generator=generator), dim=1) @ F.normalize(torch.randn(8, 16, generator=generator), dim=1).t()
    scores[:, 0] += 0.3  # one prototype favoured by every sample
    codes = sinkhorn(scores)  # paper defaults: eps 0.05, 3 iterations
    assert codes.shape == (64, 8) and (codes >= 0).all()
    assert torch.allclose(codes.sum(1), torch.ones(64), atol=1e-5)
    softmax_spread = (F.softmax(scores / 0.05, 1).sum(0) - 8.0).abs().max()  # 64 samples / 8 prototypes
    assert (codes.sum(0) - 8.0).abs().max() < 0.2 * softmax_spread
    converged = sinkhorn(scores, iterations=200)
    assert torch.allclose(converged.sum(0), torch.full((8,), 8.0), atol=1e-3)
    sharp = sinkhorn(scores, epsilon=0.005)  # exp(+-200 and more): finite, no prototype column flushed to 0
    assert torch.isfinite(sharp).all() and torch.allclose(sharp.sum(1), torch.ones(64), atol=1e-5)
    assert torch.isfinite(sinkhorn(scores + 1000.0)).all()
    with pytest.raises(ValueError):
        sinkhorn(scores, epsilon=0.0)


def test_swav_loss_matches_a_hand_worked_example():
    # B = 1, K = 2, temperature 1. log softmax: crop0 [ln 3, 0] -> [ln 3/4, ln 1/4]; crop1 [0, 0] -> [ln 1/2] x 2;
    # crop2 (local) [0, ln 3] -> [ln 1/4, ln 3/4]. Codes: q0 = [1, 0], q1 = [1/2, 1/2].
    # Assigned crop 0, predicted from crops 1 and 2: (ln 2 + ln 4) / 2 = 1.5 ln 2.
    # Assigned crop 1, predicted from crops 0 and 2: (ln(16/3) / 2 + ln(16/3) / 2) / 2 = ln(16/3) / 2.
    scores = torch.tensor([[[math.log(3), 0.0]], [[0.0, 0.0]], [[0.0, math.log(3)]]])
    codes = torch.tensor([[[1.0, 0.0]], [[0.5, 0.5]]])
    expected = (1.5 * math.log(2) + 0.5 * math.log(16 / 3)) / 2
    assert swav_loss(scores, codes, (0, 1), temperature=1.0).item() == pytest.approx(expected, rel=1e-6)
    assert swav_loss(0.1 * scores, codes, (0, 1), temperature=0.1).item() == pytest.approx(expected, rel=1e-5)
    # Two crops only: each code is predicted from the other crop: (ln 2 + ln(16/3) / 2) / 2.
    assert swav_loss(scores[:2], codes, (0, 1), 1.0).item() == pytest.approx((math.log(2) + 0.5 * math.log(16 / 3)) / 2, rel=1e-6)
    with pytest.raises(ValueError):
        swav_loss(scores, codes, (0,), 1.0)


def test_dino_loss_matches_a_hand_worked_example():
    # centre [ln 2, 0]: teacher0 [ln 6, 0] -> softmax [3/4, 1/4]; teacher1 [ln 2, 0] -> [1/2, 1/2].
    # Student log softmax: s0 [0, 0] -> [ln 1/2] x 2, s1 [ln 3, 0] -> [ln 3/4, ln 1/4], s2 [0, ln 3] -> [ln 1/4, ln 3/4].
    # Pairs: (t0, s1) = H(3/4, 1/4) = 2 ln 2 - 3/4 ln 3; (t0, s2) = 2 ln 2 - 1/4 ln 3;
    #        (t1, s0) = ln 2; (t1, s2) = 2 ln 2 - 1/2 ln 3. Mean of the four.
    student = torch.tensor([[[0.0, 0.0]], [[math.log(3), 0.0]], [[0.0, math.log(3)]]])
    teacher = torch.tensor([[[math.log(6), 0.0]], [[math.log(2), 0.0]]])
    center = torch.tensor([math.log(2), 0.0])
    ln2, ln3 = math.log(2), math.log(3)
    expected = ((2 * ln2 - 0.75 * ln3) + (2 * ln2 - 0.25 * ln3) + ln2 + (2 * ln2 - 0.5 * ln3)) / 4
    assert dino_loss(student, teacher, center, 1.0, 1.0).item() == pytest.approx(expected, rel=1e-6)
    scaled = dino_loss(0.1 * student, 0.04 * teacher, 0.04 * center, 0.1, 0.04)
    assert scaled.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError):
        dino_loss(student[:1], teacher, center)


def test_teacher_temperature_warms_up_linearly_then_stays():
    assert teacher_temperature_at(0, 10, 0.04, 0.07) == pytest.approx(0.04)
    assert teacher_temperature_at(5, 10, 0.04, 0.07) == pytest.approx(0.055)
    assert teacher_temperature_at(10, 10, 0.04, 0.07) == 0.07 and teacher_temperature_at(99, 10, 0.04, 0.07) == 0.07
    assert teacher_temperature_at(0, 0, 0.04, 0.07) == 0.07


# ---------------------------------------------------------------- multi-crop views


def test_multicrop_views_shapes_keys_and_pickling():
    recipe = MultiCropViews(32, 16, [0.5] * 3, [0.25] * 3, num_local=3)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    views = pickle.loads(pickle.dumps(recipe))(image, None)
    assert list(views) == ["global0", "global1", "local0", "local1", "local2"] == recipe.keys()
    assert all(views[f"global{i}"].shape == (3, 32, 32) for i in range(2))
    assert all(views[f"local{i}"].shape == (3, 16, 16) for i in range(3))
    assert not torch.equal(views["global0"], views["global1"])
    with pytest.raises(ValueError):
        MultiCropViews(32, 48, [0.5] * 3, [0.25] * 3, num_local=2)
    with pytest.raises(ValueError):
        MultiCropViews(32, 16, [0.5] * 3, [0.25] * 3, num_local=2, local_scale=(0.5, 0.1))


def test_fixed_size_vit_gets_local_crops_at_the_global_size():
    cnn = _build("swav")
    assert cnn.local_crop_size == LOCAL and cnn.views().local_transform.transforms[0].size == (LOCAL, LOCAL)
    vit = _build("dino", backbone="vit-tiny-cifar", size=32, local_crop_size=16)
    assert vit.local_crop_size == 32  # timm ViT built for 32 px refuses 16 px input
    assert accepted_local_size(cnn.encoder.backbone, SIZE, LOCAL) == LOCAL


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["vit-tiny-cifar", "timm:vit_tiny_patch16_224"])
def test_dino_with_a_vit_backbone_trains_one_step(backbone):
    objective = _build("dino", backbone=backbone, size=32, local_crop_size=16)
    recipe = objective.views()
    rng = np.random.default_rng(0)
    samples = [recipe(Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)), None) for _ in range(4)]
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    assert batch["local0"].shape == (4, 3, 32, 32)
    optimizer = torch.optim.AdamW(objective.parameter_groups(0.04), lr=1e-3)
    before = objective.encoder.backbone.blocks[0].attn.qkv.weight.clone()
    outputs = objective(batch)
    outputs["loss"].backward()
    objective.before_optimizer_step(0, 10)
    optimizer.step()
    objective.after_step(0, 10)
    assert torch.isfinite(outputs["loss"]) and outputs["embedding_std"] > 0
    assert not torch.equal(objective.encoder.backbone.blocks[0].attn.qkv.weight, before)


# ---------------------------------------------------------------- SwAV objective


@pytest.mark.parametrize("jointly", [False, True])
def test_swav_forward_is_swapped_prediction_on_sinkhorn_codes_with_unit_prototypes(jointly):
    objective = _build("swav", temperature=0.2, encode_crops_jointly=jointly)
    assert torch.allclose(objective.prototypes.weight.norm(dim=1), torch.ones(12), atol=1e-6)
    batch = _crops(8)
    outputs = objective(batch)
    names = ["global0", "global1", "local0", "local1"]
    with torch.no_grad():
        if jointly:  # one backbone pass per resolution: the globals together, then the locals (BN over both)
            features = torch.cat([objective.encoder.encode_image(torch.cat([batch["global0"], batch["global1"]])),
                                  objective.encoder.encode_image(torch.cat([batch["local0"], batch["local1"]]))])
        else:  # one pass per crop
            features = torch.cat([objective.encoder.encode_image(batch[name]) for name in names])
        z = F.normalize(objective.projector(features), dim=1)
        scores = (z @ objective.prototypes.weight.t()).view(4, 8, -1)
    codes = torch.stack([sinkhorn(scores[0]), sinkhorn(scores[1])])
    assert torch.allclose(outputs["loss"], swav_loss(scores, codes, (0, 1), 0.2), rtol=1e-5)
    assert 0 < outputs["embedding_std"] <= 1.5 and outputs["queue_used"] == 0


def test_swav_prototypes_are_frozen_in_the_first_epoch_then_trained_and_renormalised():
    with pytest.raises(ValueError, match="epochs"):  # no training-set size: an epoch is unknown
        _build("swav", freeze_prototypes_steps=None)
    spec = ObjectiveSpec(backbone="cnn-small", image_size=SIZE, options={**SMALL["swav"], "freeze_prototypes_steps": None},
                         num_train_samples=100, global_batch_size=50)  # one epoch = 2 steps
    torch.manual_seed(0)
    objective = get_objective("swav").build(spec)
    assert objective.freeze_prototypes_steps == 2
    for step, frozen in [(0, True), (1, True), (2, False)]:
        objective.zero_grad(set_to_none=True)
        objective(_crops(8, step=step))["loss"].backward()
        objective.before_optimizer_step(step, 10)
        assert (objective.prototypes.weight.grad is None) == frozen
        assert objective.projector[0].weight.grad is not None
    with torch.no_grad():
        objective.prototypes.weight.mul_(3.0)
    objective.after_step(2, 10)
    assert torch.allclose(objective.prototypes.weight.norm(dim=1), torch.ones(12), atol=1e-6)


def test_swav_queue_fills_after_the_start_and_joins_sinkhorn_once_full():
    objective = _build("swav", queue_length=16, queue_start_steps=1)
    objective(_crops(8, step=0))
    objective.after_step(0, 10)  # before the start: nothing enqueued
    assert int(objective.queue_filled) == 0
    embeddings = []
    for step in (1, 2):
        objective(_crops(8, step=step))
        embeddings.append(objective._pending.clone())
        objective.after_step(step, 10)
    assert int(objective.queue_filled) == 16
    # Newest first: step 2's embeddings of crop 0 then step 1's.
    assert torch.allclose(objective.queue[0], torch.cat([embeddings[1][:, 0], embeddings[0][:, 0]]))
    batch = _crops(8, step=3)
    outputs = objective(batch)
    assert outputs["queue_used"] == 1
    with torch.no_grad():
        crops = [batch[k] for k in ("global0", "global1", "local0", "local1")]
        features = torch.cat([objective.encoder.encode_image(crop) for crop in crops])  # one pass per crop
        scores = objective.prototypes(F.normalize(objective.projector(features), dim=1)).view(4, 8, -1)
        queue_scores = [objective.queue[i] @ objective.prototypes.weight.t() for i in range(2)]
    codes = torch.stack([sinkhorn(torch.cat([queue_scores[i], scores[i]]))[-8:] for i in range(2)])
    assert torch.allclose(outputs["loss"], swav_loss(scores, codes, (0, 1), 0.1), rtol=1e-5)
    assert not torch.allclose(codes[0], sinkhorn(scores[0]), atol=1e-3)  # the queue changed the codes
    small = _build("swav", queue_length=4, queue_start_steps=0)
    small(_crops(8))
    with pytest.raises(ValueError, match="queue_length"):  # shorter than the global batch of 8
        small.after_step(0, 10)


# ---------------------------------------------------------------- DINO objective


def test_dino_head_is_mlp_bottleneck_and_weight_normalised_last_layer():
    objective = _build("dino")
    head = objective.head
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert head.mlp[-1].out_features == 16 and not head.last_layer.norm.requires_grad
    x = torch.randn(5, objective.encoder.embed_dim)
    direction = F.normalize(head.last_layer.direction, dim=1)
    assert torch.allclose(head(x), F.normalize(head.mlp(x), dim=1) @ direction.t(), atol=1e-6)
    assert _build("dino", norm_last_layer=False).head.last_layer.norm.requires_grad


def test_dino_centre_is_an_ema_of_teacher_means_and_temperature_follows_the_step():
    objective = _build("dino", center_momentum=0.9)
    batch = _crops(8)
    outputs = objective(batch)
    assert outputs["teacher_temperature"].item() == pytest.approx(0.04)
    with torch.no_grad():
        teacher = objective.teacher_head(torch.cat([objective.teacher_encoder.encode_image(batch[k]) for k in ("global0", "global1")]))
    teacher_before = objective.teacher_head.mlp[0].weight.clone()
    _perturb(objective.head)
    objective.after_step(0, 10)
    assert torch.allclose(objective.center, 0.1 * teacher.mean(0), atol=1e-6)
    m = momentum_at(0, 10, 0.996)
    assert torch.allclose(objective.teacher_head.mlp[0].weight, m * teacher_before + (1 - m) * objective.head.mlp[0].weight, atol=1e-6)
    assert int(objective.steps_done) == 1
    assert objective(batch)["teacher_temperature"].item() == pytest.approx(teacher_temperature_at(1, 4, 0.04, 0.07))


def test_dino_last_layer_is_frozen_in_the_first_epoch_only():
    spec = ObjectiveSpec(backbone="cnn-small", image_size=SIZE, num_train_samples=100, global_batch_size=50,
                         options={**SMALL["dino"], "freeze_last_layer_steps": None, "norm_last_layer": False})
    torch.manual_seed(0)
    objective = get_objective("dino").build(spec)
    assert objective.freeze_last_layer_steps == 2
    for step, frozen in [(0, True), (1, True), (2, False)]:
        objective.zero_grad(set_to_none=True)
        objective(_crops(8, step=step))["loss"].backward()
        objective.before_optimizer_step(step, 10)
        last = objective.head.last_layer
        assert (last.direction.grad is None) == frozen and (last.norm.grad is None) == frozen
        assert objective.head.mlp[0].weight.grad is not None


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("key,options", [("swav", {"queue_length": 16, "queue_start_steps": 0}), ("dino", {})])
def test_state_survives_state_dict_save_and_load(key, options, tmp_path):
    objective = _build(key, **options)
    for step in range(2):
        objective(_crops(8, step=step))["loss"].backward()
        _perturb(objective.encoder)
        objective.after_step(step, 10)
    torch.save(objective.state_dict(), tmp_path / "state.pt")
    restored = _build(key, seed=7, **options)
    restored.load_state_dict(torch.load(tmp_path / "state.pt"))
    state, loaded = objective.state_dict(), restored.state_dict()
    kept = ("queue", "queue_filled", "prototypes.weight") if key == "swav" else ("center", "steps_done", "teacher_head.mlp.0.weight")
    assert all(name in state for name in kept)
    assert all(torch.equal(state[n], loaded[n]) for n in state)
    if key == "swav":
        assert int(restored.queue_filled) == 16 and restored.queue.abs().sum() > 0
    else:
        assert restored.center.abs().sum() > 0 and int(restored.steps_done) == 2
        assert any(n.startswith("teacher_encoder") for n in state)
    objective.eval(), restored.eval()
    batch = _crops(8, step=5)
    assert torch.allclose(objective(batch)["loss"], restored(batch)["loss"])


# ---------------------------------------------------------------- two processes = one process


def _global_crops(step: int = 0) -> dict:
    return _crops(16, step=step)


def _build_swav():  # module level: the two-process helper pickles these
    return _build("swav", queue_length=32, queue_start_steps=0)


def _build_dino():
    return _build("dino")


@pytest.mark.parametrize("build,steps", [(_build_swav, 3), (_build_dino, 2)])
def test_two_processes_equal_one_process(build, steps, tmp_path):
    """swav: Sinkhorn sums all-reduced, and from the third step the queue (filled by two steps of 16) joins
    them; dino: the centre is the all-reduced teacher mean, used by the second step's loss."""
    assert_two_processes_match_one(build, _global_crops, tmp_path, steps=steps)


# ---------------------------------------------------------------- learning on CIFAR-10
