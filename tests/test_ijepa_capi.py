"""I-JEPA (Assran et al. 2023) and CAPI (Darcet et al. 2025): their mask generators, losses by hand, predictors and
objectives (build, forward, backward, state, options), and CAPI's 2 processes = 1 process."""
from __future__ import annotations

import math

import pytest
import torch
from distributed_helpers import assert_two_processes_match_one
from PIL import Image

import trainer.objectives.capi  # noqa: F401  (registration)
import trainer.objectives.ijepa  # noqa: F401  (registration)
from trainer.data.masking import (
    inverse_block_keep,
    multi_block_context_count,
    multi_block_masks,
    multi_block_target_shapes,
)
from trainer.data.pipeline import collate
from trainer.losses.capi import capi_loss, capi_targets
from trainer.losses.ijepa import ijepa_loss
from trainer.models.vit import forward_vit, vit_backbone
from trainer.objectives import ObjectiveSpec, get_objective
from trainer.objectives.capi import capi_mask_counts, packed_capi_masks

SIZE = 16  # vit-micro-cifar: patch 4, a 4 x 4 grid
IJEPA_SMALL = {"predictor_dim": 32, "predictor_depth": 1, "predictor_heads": 2}
CAPI_SMALL = {"num_clusters": 6, "predictor_depth": 1, "prediction_fraction": 0.5, "momentum": 0.99}


def _rectangle(indices: list[int], columns: int) -> tuple[int, int]:
    """(height, width) when ``indices`` are a full rectangle of the grid in raster order, else an AssertionError."""
    rows_, columns_ = zip(*(divmod(i, columns) for i in indices))
    top, left = min(rows_), min(columns_)
    height, width = max(rows_) - top + 1, max(columns_) - left + 1
    assert indices == [(top + i) * columns + left + j for i in range(height) for j in range(width)]
    return height, width


def _cyclic_span(values: set[int], n: int) -> int:
    """The length of the shortest cyclic interval of Z_n holding ``values``."""
    return min(next(length for length in range(1, n + 1) if all((v - start) % n < length for v in values))
               for start in values)


# ---------------------------------------------------------------- I-JEPA masks


def test_target_shapes_are_the_middle_block_and_its_rotations_of_one_area():
    assert multi_block_target_shapes(8) == [(3, 4), (4, 3)]  # int(64 * 0.175) = 11, a = 1.125: 4 x 3 = 12
    assert multi_block_target_shapes(14) == [(5, 6), (6, 5)]
    assert multi_block_target_shapes(4) == [(2, 1)]  # 1 x 2 has aspect 0.5, outside 0.75-1.5: only the middle block
    assert multi_block_target_shapes(8, (0.25, 0.25), (1.0, 1.0)) == [(4, 4)]
    assert multi_block_context_count(8, 0.25) == 16 and multi_block_context_count(4, 0.01) == 1
    with pytest.raises(ValueError, match="target_scale"):
        multi_block_target_shapes(8, (0.3, 0.2))
    with pytest.raises(ValueError, match="context_ratio"):
        multi_block_context_count(8, 1.0)


def test_multi_block_masks_shapes_disjointness_and_geometry():
    generator = torch.Generator().manual_seed(0)
    shapes, orientations, corners = set(multi_block_target_shapes(8)), set(), set()
    for _ in range(200):
        context, targets = multi_block_masks(8, generator=generator)
        assert context.shape == (16,) and targets.shape == (4, 12) and context.dtype == targets.dtype == torch.long
        assert torch.equal(context, context.unique())  # ascending, no repeats
        assert not set(context.tolist()) & set(targets.flatten().tolist())  # target patches left the context
        for block in targets.tolist():
            shape = _rectangle(block, 8)
            assert shape in shapes
            orientations.add(shape)
            corners.add(divmod(block[0], 8))
    assert orientations == shapes  # both orientations are drawn
    assert {top for top, _ in corners} == set(range(6)) and {left for _, left in corners} == set(range(6))


def test_multi_block_context_lies_in_one_square_block_of_the_context_scale():
    generator = torch.Generator().manual_seed(1)
    for _ in range(50):  # context block side round(sqrt(64 * 0.25)) = 4; one 2 x 2 target; 6 context patches
        context, targets = multi_block_masks(8, 1, (0.05, 0.05), (1.0, 1.0), (0.25, 0.25), 0.1, generator)
        assert context.shape == (6,) and targets.shape == (1, 4)
        rows, columns = zip(*(divmod(i, 8) for i in context.tolist()))
        assert max(rows) - min(rows) < 4 and max(columns) - min(columns) < 4


def test_multi_block_masks_are_a_pure_function_of_the_generator_and_refuse_impossible_contexts():
    first = multi_block_masks(8, generator=torch.Generator().manual_seed(3))
    again = multi_block_masks(8, generator=torch.Generator().manual_seed(3))
    other = multi_block_masks(8, generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    with pytest.raises(ValueError, match="lower context_ratio"):  # 52 of 64 patches cannot avoid 4 blocks of 12
        multi_block_masks(8, context_ratio=0.8, generator=torch.Generator().manual_seed(0), max_tries=20)


# ---------------------------------------------------------------- CAPI masks


def test_inverse_block_keep_is_a_raster_prefix_of_one_block():
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):
        keep = inverse_block_keep(8, 0.65, roll=False, generator=generator).tolist()
        assert len(keep) == 64 - int(64 * 0.65) == 23 and keep == sorted(set(keep))
        top, left = divmod(keep[0], 8)
        width = max(i % 8 for i in keep) - left + 1
        assert keep == [(top + i // width) * 8 + left + i % width for i in range(23)]  # rows of the block, in order
        assert 4 <= width <= 7  # aspect 2: ceil(sqrt(23 / 2)) = 4 wide; aspect 0.5: ceil(sqrt(46)) = 7


def test_inverse_block_keep_rolls_the_block_around_the_grid():
    generator = torch.Generator().manual_seed(1)
    wrapped = 0
    for _ in range(100):
        keep = inverse_block_keep(8, 0.65, generator=generator).tolist()
        assert len(keep) == 23
        rows, columns = {i // 8 for i in keep}, {i % 8 for i in keep}
        assert _cyclic_span(rows, 8) * _cyclic_span(columns, 8) < 23 + 8  # one block (maybe split by the edges)
        wrapped += max(rows) - min(rows) + 1 > _cyclic_span(rows, 8)
    assert wrapped > 10  # the roll wraps blocks across the edges
    assert torch.equal(inverse_block_keep(8, 0.65, generator=torch.Generator().manual_seed(5)),
                       inverse_block_keep(8, 0.65, generator=torch.Generator().manual_seed(5)))
    with pytest.raises(ValueError, match="mask_ratio"):
        inverse_block_keep(8, 1.0)


@pytest.mark.parametrize("masking", ["inverse_block", "random"])
def test_capi_masks_pack_visible_then_predicted_masked_patches(masking):
    assert capi_mask_counts((8, 8), 0.65, 0.05) == (23, 2) and capi_mask_counts((4, 4), 0.65, 0.01) == (6, 1)
    generator = torch.Generator().manual_seed(2)
    for _ in range(20):
        packed = packed_capi_masks((8, 8), 0.65, masking, (0.5, 2.0), True, 0.5, generator)
        visible, predicted = packed[:23].tolist(), packed[23:].tolist()
        assert len(predicted) == 20 and visible == sorted(set(visible)) and predicted == sorted(set(predicted))
        assert not set(visible) & set(predicted)  # the student predicts masked patches only


# ---------------------------------------------------------------- losses, by hand


def test_ijepa_loss_by_hand():
    predictions = torch.tensor([[0.5, 2.0], [3.0, -4.0]], requires_grad=True)
    targets = torch.zeros(2, 2, requires_grad=True)
    loss = ijepa_loss(predictions, targets)
    torch.testing.assert_close(loss, torch.tensor((0.25 + 4 + 9 + 16) / 4))  # mean squared error per element
    smooth = ijepa_loss(predictions, targets, "smooth_l1")  # 0.5 x^2 below 1, |x| - 0.5 above
    torch.testing.assert_close(smooth, torch.tensor((0.125 + 1.5 + 2.5 + 3.5) / 4))
    torch.testing.assert_close(ijepa_loss(predictions, targets, reduce_mean=lambda t: t / 2), loss / 2)
    loss.backward()
    torch.testing.assert_close(predictions.grad, predictions.detach() / 2)  # d/dx of mean(x^2) over 4 = x / 2
    assert targets.grad is None
    with pytest.raises(ValueError, match="differ"):
        ijepa_loss(predictions, targets[0])
    with pytest.raises(ValueError, match="kind"):
        ijepa_loss(predictions, targets, "l1")


def test_capi_targets_are_position_wise_sinkhorn_by_hand():
    # n = 2 images, L = 2 positions, K = 2 clusters; exp(logits / tau) per position:
    # position 0 [[1, 2], [3, 2]]: columns / [4, 4] -> [[1/4, 1/2], [3/4, 1/2]], rows -> [[1/3, 2/3], [3/5, 2/5]]
    # position 1 [[1, 1], [1, 3]]: columns / [2, 4] -> [[1/2, 1/4], [1/2, 3/4]], rows -> [[2/3, 1/3], [2/5, 3/5]]
    exp = torch.tensor([[[1.0, 2.0], [1.0, 1.0]], [[3.0, 2.0], [1.0, 3.0]]])
    expected = torch.tensor([[[1 / 3, 2 / 3], [2 / 3, 1 / 3]], [[3 / 5, 2 / 5], [2 / 5, 3 / 5]]])
    torch.testing.assert_close(capi_targets(exp.log() * 0.5, temperature=0.5, iterations=1), expected)
    balanced = capi_targets(torch.randn(6, 3, 4, generator=torch.Generator().manual_seed(0)), 0.1, iterations=300)
    torch.testing.assert_close(balanced.sum(dim=-1), torch.ones(6, 3))
    torch.testing.assert_close(balanced.sum(dim=0), torch.full((3, 4), 6 / 4), rtol=1e-3, atol=1e-3)  # per position
    with pytest.raises(ValueError, match=r"\[n, L, K\]"):
        capi_targets(torch.zeros(2, 3))


def test_capi_loss_by_hand():
    student = torch.tensor([[[0.0, math.log(3.0)]]], requires_grad=True) * 0.5  # softmax at tau 0.5: [1/4, 3/4]
    targets = torch.tensor([[[0.5, 0.5]]])
    clustering = torch.zeros(1, 2, 2, requires_grad=True)  # uniform predictions at every teacher patch
    assignments = torch.tensor([[[1.0, 0.0], [0.25, 0.75]]])
    terms = capi_loss(student, targets, clustering, assignments, student_temperature=0.5, clustering_temperature=0.7)
    prediction = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    torch.testing.assert_close(terms.prediction, torch.tensor(prediction))
    torch.testing.assert_close(terms.clustering, torch.tensor(math.log(2.0)))
    torch.testing.assert_close(terms.loss, torch.tensor(prediction + math.log(2.0)))
    terms.loss.backward()
    # d/dz of the mean over 2 tokens of H(q, softmax(z / 0.7)) = (softmax - q) / (0.7 * 2)
    torch.testing.assert_close(clustering.grad, (0.5 - assignments) / 1.4)
    with pytest.raises(ValueError, match="differ"):
        capi_loss(student, targets[:, :, :1], clustering, assignments)


# ---------------------------------------------------------------- the objectives


def _build(key: str, seed: int = 0, backbone: str = "vit-micro-cifar", **options):
    torch.manual_seed(seed)
    small = IJEPA_SMALL if key == "ijepa" else CAPI_SMALL
    spec = ObjectiveSpec(backbone=backbone, image_size=SIZE, options={**small, **options}, register_tokens=1)
    return get_objective(key).build(spec)


def _batch(objective, n: int = 4, seed: int = 5) -> dict:
    generator = torch.Generator().manual_seed(seed)
    if objective.key == "ijepa":
        o = objective.options
        from trainer.objectives.ijepa import packed_multi_block_masks
        masks = [packed_multi_block_masks(objective.grid, o.num_targets, o.target_scale, o.target_aspect_ratio,
                                          o.context_scale, o.context_ratio, generator) for _ in range(n)]
    else:
        o = objective.options
        masks = [packed_capi_masks(objective.grid, o.mask_ratio, o.masking, o.block_aspect_ratio, o.roll,
                                   o.prediction_fraction, generator) for _ in range(n)]
    return {"global0": torch.randn(n, 3, SIZE, SIZE, generator=generator), "masks/global0": torch.stack(masks)}


@pytest.mark.parametrize("key", ["ijepa", "capi"])
def test_views_make_one_plain_crop_and_packed_masks(key):
    objective = _build(key)
    recipe = objective.views()
    samples = [recipe(Image.new("RGB", (40, 40), (40 * i, 30, 200)), None) for i in range(3)]
    batch = collate(samples)
    assert sorted(batch) == ["global0", "masks/global0"] and batch["global0"].shape == (3, 3, SIZE, SIZE)
    if key == "ijepa":  # C = int(16 * 0.25) = 4 context patches, then 4 blocks of 2
        assert batch["masks/global0"].shape == (3, 4 + 4 * 2)
        context, targets = objective.split_masks(batch["masks/global0"])
        assert context.shape == (3, 4) and targets.shape == (4, 3, 2)
        assert all(not set(context[i].tolist()) & set(targets[:, i].flatten().tolist()) for i in range(3))
    else:  # V = 16 - int(16 * 0.65) = 6 visible, P = int(10 * 0.5) = 5 predicted
        assert batch["masks/global0"].shape == (3, 6 + 5)
    with pytest.raises(ValueError, match="packed masks"):
        objective.split_masks(batch["masks/global0"][:, :-1])


@pytest.mark.parametrize("key", ["ijepa", "capi"])
def test_forward_backward_and_state(key):
    objective = _build(key)
    assert objective.encoder.config.vit_pool == "avg"  # both papers evaluate average-pooled patch tokens
    outputs = objective(_batch(objective))
    assert all(torch.isfinite(value) for value in outputs.values())
    outputs["loss"].backward()
    trained = [objective.encoder, objective.predictor]
    trained += [objective.head, objective.clustering] if key == "capi" else []
    for module in trained:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), type(module).__name__
    assert all(p.grad is None for p in objective.target_encoder.parameters())
    if key == "capi":
        torch.testing.assert_close(outputs["loss"], outputs["prediction"] + outputs["clustering"])
        decay, no_decay = objective.parameter_groups(0.1)[:2]
        assert any(p is objective.clustering.layer.weight for p in no_decay["params"])
        assert not any(p is objective.clustering.layer.weight for p in decay["params"])
    state = objective.state_dict()
    assert any(name.startswith("target_encoder.") for name in state)
    assert not any(name.endswith("predictor.position") for name in state)  # a function of the grid, not state
    fresh = _build(key, seed=9)
    fresh.load_state_dict(state)
    for (name, a), b in zip(objective.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("key", ["ijepa", "capi"])
def test_only_the_context_patches_reach_the_student(key):
    """The teacher runs without gradient, so the loss's image gradient is the student's: non-zero exactly on the
    pixels of the context (I-JEPA) / visible (CAPI) patches, the tokens the encoder keeps."""
    objective = _build(key)
    batch = _batch(objective)
    batch["global0"].requires_grad_()
    objective(batch)["loss"].backward()
    kept = objective.split_masks(batch["masks/global0"])[0]
    pixels = batch["global0"].grad.abs().sum(dim=1)  # [n, 16, 16]: 4 x 4 patches of 4 x 4 pixels
    per_patch = pixels.view(4, 4, 4, 4, 4).permute(0, 1, 3, 2, 4).sum(dim=(3, 4)).reshape(4, 16)
    for row in range(4):
        inside = torch.zeros(16, dtype=torch.bool)
        inside[kept[row]] = True
        assert (per_patch[row][inside] > 0).all() and (per_patch[row][~inside] == 0).all()


def test_ijepa_predicts_each_block_in_its_own_sequence():
    objective = _build("ijepa").eval()
    batch = _batch(objective)
    context_index, target_index = objective.split_masks(batch["masks/global0"])
    context = forward_vit(vit_backbone(objective.encoder, "ijepa"), batch["global0"], keep=context_index).patches
    both = objective.predictor(context, context_index, target_index)
    moved = target_index.clone()
    moved[1] = (moved[1] + 3) % 16
    torch.testing.assert_close(objective.predictor(context, context_index, moved)[0], both[0])  # block 0 unchanged
    assert both.shape == (4, 4, 2, 64)


def test_capi_predicts_each_masked_patch_independently():
    """Cross-attention only: a query's prediction depends on its position and the context, not the other queries."""
    objective = _build("capi").eval()
    batch = _batch(objective)
    visible, predicted = objective.split_masks(batch["masks/global0"])
    student = forward_vit(vit_backbone(objective.encoder, "capi"), batch["global0"], keep=visible)
    assert student.num_prefix_tokens == 2  # class token and one register
    full = objective.predictor(student.tokens, student.num_prefix_tokens, visible, predicted)
    first = objective.predictor(student.tokens, student.num_prefix_tokens, visible, predicted[:, :1])
    torch.testing.assert_close(first, full[:, :1], rtol=1e-5, atol=1e-6)


def test_ijepa_target_follows_the_linear_momentum_schedule():
    objective = _build("ijepa")
    with torch.no_grad():
        for p in objective.encoder.parameters():
            p.add_(0.1)
    online = next(objective.encoder.parameters()).detach().clone()
    before = next(objective.target_encoder.parameters()).detach().clone()
    objective.after_step(4, 10)  # after 5 of 10 steps: 0.996 + 0.004 * 0.5
    m = 0.998
    torch.testing.assert_close(next(objective.target_encoder.parameters()), m * before + (1 - m) * online)


def test_ijepa_sincos_position_embedding_is_fixed_and_shared_with_the_target():
    from trainer.models.vit import vit_backbone
    from trainer.objectives.mae import sincos_2d

    objective = _build("ijepa", position_embedding="sincos")
    for encoder in (objective.encoder, objective.target_encoder):
        embedding = vit_backbone(encoder, "ijepa").pos_embed
        assert not embedding.requires_grad
        prefix = embedding.shape[1] - 16  # 4 x 4 patches at SIZE
        torch.testing.assert_close(embedding[0, prefix:], sincos_2d(embedding.shape[-1], 4, 4))
        assert not embedding[0, :prefix].any()  # zero at the class and register tokens
    trainable = {id(p) for group in objective.parameter_groups(0.05) for p in group["params"]}
    assert id(vit_backbone(objective.encoder, "ijepa").pos_embed) not in trainable
    learned = _build("ijepa")
    assert learned.encoder.state_dict().keys() == objective.encoder.state_dict().keys()


@pytest.mark.parametrize("key", ["ijepa", "capi"])
def test_a_cnn_is_refused(key):
    with pytest.raises(ValueError, match=rf"{key} needs a ViT backbone \(vit-tiny-cifar, vit-small-cifar, "
                                         r"timm:vit_\*\), got cnn-small"):
        _build(key, backbone="cnn-small")


@pytest.mark.parametrize("key,options,match", [
    ("ijepa", {"num_targets": 0}, "num_targets must be >= 1"),
    ("ijepa", {"context_ratio": 1.0}, r"context_ratio must be in \(0, 1\)"),
    ("ijepa", {"context_ratio": 0.9}, "lower context_ratio"),
    ("ijepa", {"target_scale": [0.2, 0.1]}, "target_scale"),
    ("ijepa", {"predictor_dim": 30, "predictor_heads": 3}, "predictor_dim must be a multiple"),
    ("ijepa", {"loss": "l1"}, "loss must be one of"),
    ("ijepa", {"momentum": 1.1}, "momentum"),
    ("ijepa", {"position_embedding": "rope"}, "position_embedding must be one of sincos, learned"),
    ("capi", {"num_clusters": 1}, "num_clusters must be >= 2"),
    ("capi", {"mask_ratio": 1.0}, "mask_ratio"),
    ("capi", {"masking": "block"}, "masking must be one of"),
    ("capi", {"prediction_fraction": 0.0}, "prediction_fraction"),
    ("capi", {"target_temperature": 0}, "target_temperature must be > 0"),
    ("capi", {"predictor_dim": 30}, "predictor width 30 must be a multiple"),
    ("capi", {"crop_scale": [0.5, 0.2]}, "crop_scale"),
])
def test_option_errors_are_clear(key, options, match):
    with pytest.raises(ValueError, match=f"{key}: .*{match}"):
        _build(key, **options)


def _build_capi_for_processes():
    return _build("capi")


def _capi_batch_for_processes(step: int = 0) -> dict:
    generator = torch.Generator().manual_seed(11 + step)
    masks = [packed_capi_masks((4, 4), 0.65, "inverse_block", (0.5, 2.0), True, 0.5, generator) for _ in range(8)]
    return {"global0": torch.randn(8, 3, SIZE, SIZE, generator=generator), "masks/global0": torch.stack(masks)}


def test_capi_two_processes_equal_one_process(tmp_path):
    """Sinkhorn's column sums and maximum are all-reduced and both cross-entropies are global-batch means, so 2
    processes on halves give the loss and gradients of 1 process on the whole batch; two steps, so the teacher's
    EMA update is in the second."""
    assert_two_processes_match_one(_build_capi_for_processes, _capi_batch_for_processes, tmp_path, steps=2)
