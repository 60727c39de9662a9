"""MSN / PMSN (Assran et al. 2022, 2023), their losses, KoLeo, patch masking and ViT patch-token access."""
from __future__ import annotations

import math
import pickle
from functools import partial

import pytest
import torch
from distributed_helpers import assert_two_processes_match_one
from PIL import Image

import trainer.objectives.msn  # noqa: F401  (registration)
from trainer.data.masking import (
    WithKeepIndices,
    block_keep,
    dropped_indices,
    kept_count,
    random_keep,
)
from trainer.data.views import AugmentConfig, OneView
from trainer.losses.koleo import koleo
from trainer.losses.msn import (
    mean_entropy,
    msn,
    msn_targets,
    pmsn,
    power_law_prior,
    prior_kl,
    prototype_log_probabilities,
)
from trainer.models import build_backbone
from trainer.models.vit import forward_vit, is_vit, patch_grid, vit_backbone
from trainer.objectives import ObjectiveSpec, get_objective
from trainer.objectives.momentum import momentum_at

SIZE, FOCAL = 16, 8  # vit-micro-cifar: patch 4, so a 4 x 4 grid and 2 x 2 focal grids
SMALL = {"projection_dim": 8, "projection_hidden_dim": 16, "num_prototypes": 6, "num_focal_views": 2,
         "focal_crop_size": FOCAL, "mask_ratio": 0.25}


def _vit(size: int = SIZE):
    torch.manual_seed(0)
    return build_backbone("vit-micro-cifar", size).module


# ---------------------------------------------------------------- masks


def test_random_keep_draws_sorted_distinct_patches_at_the_authors_count():
    assert kept_count((4, 4), 0.25) == 12 and kept_count(8, 0.15) == 54  # floor(64 * 0.85) = floor(54.4)
    assert kept_count(2, 0.9) == 1  # never empty
    masks = random_keep((4, 4), 0.25, torch.Generator().manual_seed(0), count=50)
    assert masks.shape == (50, 12) and masks.dtype == torch.long
    assert all(torch.equal(row, row.unique()) for row in masks)  # sorted, no repeats
    assert masks.min() >= 0 and masks.max() <= 15
    assert len({tuple(row.tolist()) for row in masks}) > 40  # independent draws differ
    again = random_keep((4, 4), 0.25, torch.Generator().manual_seed(0), count=50)
    assert torch.equal(masks, again)  # a pure function of the generator
    assert random_keep(4, 0.0).tolist() == list(range(16))
    with pytest.raises(ValueError, match="mask_ratio"):
        random_keep(4, 1.0)


def test_block_keep_is_one_contiguous_block_anywhere_in_the_grid():
    masks = block_keep((3, 4), (2, 3), torch.Generator().manual_seed(1), count=200)
    assert masks.shape == (200, 6)
    corners = set()
    for row in masks.tolist():
        top, left = divmod(row[0], 4)
        assert row == [(top + i) * 4 + left + j for i in range(2) for j in range(3)]  # raster order
        corners.add((top, left))
    assert corners == {(t, c) for t in range(2) for c in range(2)}  # every position is drawn
    assert block_keep(2, 2).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="does not fit"):
        block_keep(2, 3)


def test_dropped_indices_is_the_complement():
    assert dropped_indices(torch.tensor([0, 2, 3]), 5).tolist() == [1, 4]
    assert dropped_indices(torch.tensor([[1, 2], [0, 3]]), 4).tolist() == [[0, 3], [1, 2]]


def test_with_keep_indices_adds_a_mask_per_view_and_pickles():
    recipe = WithKeepIndices(OneView(SIZE, [0.5] * 3, [0.25] * 3, AugmentConfig()),
                             {"image": partial(random_keep, (4, 4), 0.5)})
    recipe = pickle.loads(pickle.dumps(recipe))  # data workers receive it pickled
    out = recipe(Image.new("RGB", (20, 20), (10, 200, 30)), None)
    assert sorted(out) == ["image", "keep/image"] and out["keep/image"].shape == (8,)
    with pytest.raises(KeyError, match="view0"):
        WithKeepIndices(recipe.recipe, {"view0": partial(random_keep, 4, 0.5)})(Image.new("RGB", (20, 20)), None)


# ---------------------------------------------------------------- ViT patch tokens


def test_forward_vit_is_the_backbone_forward_without_a_mask():
    vit = _vit().eval()
    images = torch.randn(3, 3, SIZE, SIZE)
    out = forward_vit(vit, images)
    torch.testing.assert_close(out.features, vit(images), rtol=0, atol=0)
    assert out.tokens.shape == (3, 1 + 16, 64) and out.prefix.shape == (3, 1, 64) and out.patches.shape == (3, 16, 64)
    torch.testing.assert_close(forward_vit(vit, images, torch.arange(16)).tokens, out.tokens)  # keep all = no mask


def test_forward_vit_drops_the_patches_outside_keep():
    vit = _vit().eval()
    images = torch.randn(2, 3, SIZE, SIZE)
    keep = torch.tensor([[0, 5, 10, 15], [1, 2, 3, 4]])
    out = forward_vit(vit, images, keep)
    assert out.tokens.shape == (2, 1 + 4, 64)
    changed = images.clone()
    for row, kept in enumerate(keep):  # new pixels in every dropped patch (4 x 4 px cells, raster order)
        for patch in dropped_indices(kept, 16).tolist():
            top, left = divmod(patch, 4)
            changed[row, :, 4 * top:4 * top + 4, 4 * left:4 * left + 4] = torch.randn(3, 4, 4)
    torch.testing.assert_close(forward_vit(vit, changed, keep).tokens, out.tokens, rtol=0, atol=0)
    shared = forward_vit(vit, images, keep[0])  # one keep for the whole batch = the same keep per image
    torch.testing.assert_close(shared.tokens, forward_vit(vit, images, keep[0].expand(2, -1)).tokens)


def test_forward_vit_takes_smaller_crops_with_resampled_positions():
    vit = _vit()
    out = forward_vit(vit, torch.randn(2, 3, FOCAL, FOCAL), block_keep(2, 1, count=2))
    assert out.tokens.shape == (2, 2, 64) and torch.isfinite(out.features).all()
    with pytest.raises(ValueError, match="multiple of the ViT's patch size 4"):
        patch_grid(vit, 6)


def test_vit_checks_name_the_objective_and_the_backbone():
    assert is_vit(_vit()) and not is_vit(build_backbone("cnn-small").module)
    with pytest.raises(ValueError, match=r"msn needs a ViT backbone \(vit-tiny-cifar, vit-small-cifar, timm:vit_\*\), "
                                         r"got cnn-small"):
        get_objective("msn").build(ObjectiveSpec(backbone="cnn-small", image_size=SIZE, options=SMALL))
    assert get_objective("msn").requires_patch_tokens and get_objective("pmsn").requires_patch_tokens
    assert vit_backbone(_vit(), "x") is not None


# ---------------------------------------------------------------- losses, by hand


def test_prototype_probabilities_are_a_softmax_of_cosines():
    z = torch.tensor([[3.0, 0.0]])
    prototypes = torch.tensor([[2.0, 0.0], [0.0, 5.0]])  # normalised inside: cosines [1, 0]
    expected = torch.tensor([[math.e ** 2, 1.0]]) / (math.e ** 2 + 1)  # softmax([1, 0] / 0.5)
    torch.testing.assert_close(prototype_log_probabilities(z, prototypes, 0.5).exp(), expected)


def test_targets_at_tau_plus_equal_the_authors_sharpening():
    generator = torch.Generator().manual_seed(0)
    z, prototypes = torch.randn(5, 3, generator=generator), torch.randn(4, 3, generator=generator)
    p = prototype_log_probabilities(z, prototypes, 0.1).exp()
    sharpened = p ** 4 / (p ** 4).sum(dim=1, keepdim=True)  # the authors' sharpen(p, T=0.25)
    torch.testing.assert_close(msn_targets(z, prototypes, 0.025), sharpened)


def _authors_sinkhorn(p: torch.Tensor, iterations: int) -> torch.Tensor:
    """The authors' distributed_sinkhorn on one process, transcribed: prototypes x samples, rows then columns."""
    q = p.t().double().clone()
    prototypes, samples = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= samples
    return (q * samples).t().float()


def test_sinkhorn_targets_follow_the_authors_algorithm():
    generator = torch.Generator().manual_seed(1)
    z, prototypes = torch.randn(6, 3, generator=generator), torch.randn(4, 3, generator=generator)
    p = msn_targets(z, prototypes, 0.25)
    got = msn_targets(z, prototypes, 0.25, sinkhorn_iterations=3)
    torch.testing.assert_close(got, _authors_sinkhorn(p, 3), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(6))
    balanced = msn_targets(z, prototypes, 0.25, sinkhorn_iterations=200)
    torch.testing.assert_close(balanced.sum(dim=0), torch.full((4,), 6 / 4), rtol=1e-3, atol=1e-3)


def test_regularisers_by_hand():
    torch.testing.assert_close(mean_entropy(torch.full((4,), 0.25)), torch.tensor(0.0))
    torch.testing.assert_close(mean_entropy(torch.tensor([1.0, 0.0])), torch.tensor(math.log(2)))
    torch.testing.assert_close(mean_entropy(torch.tensor([0.5, 0.25, 0.25])),
                               torch.tensor(math.log(3) - 1.5 * math.log(2)))
    prior = torch.tensor([0.5, 0.3, 0.2])
    torch.testing.assert_close(prior_kl(prior, prior), torch.tensor(0.0))
    torch.testing.assert_close(prior_kl(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])), torch.tensor(math.log(2)))
    mean = torch.tensor([0.6, 0.3, 0.1])  # KL(mean || prior), not KL(prior || mean)
    expected = 0.6 * math.log(0.6 / 0.5) + 0.3 * math.log(0.3 / 0.3) + 0.1 * math.log(0.1 / 0.2)
    torch.testing.assert_close(prior_kl(mean, prior), torch.tensor(expected))
    torch.testing.assert_close(prior_kl(mean, torch.full((3,), 1 / 3)), mean_entropy(mean))  # uniform prior = MSN


def test_power_law_prior_by_hand():
    torch.testing.assert_close(power_law_prior(3, 1.0), torch.tensor([6 / 11, 3 / 11, 2 / 11]))
    torch.testing.assert_close(power_law_prior(4, 0.0), torch.full((4,), 0.25))
    prior = power_law_prior(1024, 0.25)
    assert prior.sum().item() == pytest.approx(1.0) and (prior[:-1] > prior[1:]).all()


def _two_anchor_views():
    """V = 2 anchor views of n = 1 image over K = 2 prototypes: p = [0.5, 0.5] and [0.8, 0.2]; target [1, 0]."""
    log_p = torch.tensor([[[0.5, 0.5]], [[0.8, 0.2]]]).log().requires_grad_()
    return log_p, torch.tensor([[1.0, 0.0]])


def test_msn_loss_by_hand():
    log_p, targets = _two_anchor_views()
    terms = msn(log_p, targets, regularisation_weight=0.5)
    cross_entropy = (-math.log(0.5) - math.log(0.8)) / 2
    regulariser = math.log(2) + 0.65 * math.log(0.65) + 0.35 * math.log(0.35)  # p_bar = [0.65, 0.35]
    torch.testing.assert_close(terms.cross_entropy, torch.tensor(cross_entropy))
    torch.testing.assert_close(terms.regulariser, torch.tensor(regulariser))
    torch.testing.assert_close(terms.loss, torch.tensor(cross_entropy + 0.5 * regulariser))
    torch.testing.assert_close(terms.mean_probabilities, torch.tensor([0.65, 0.35]))


def test_pmsn_loss_by_hand_changes_only_the_regulariser():
    log_p, targets = _two_anchor_views()
    prior = torch.tensor([2 / 3, 1 / 3])
    terms = pmsn(log_p, targets, prior, regularisation_weight=2.0)
    regulariser = 0.65 * math.log(0.65 / (2 / 3)) + 0.35 * math.log(0.35 / (1 / 3))
    torch.testing.assert_close(terms.regulariser, torch.tensor(regulariser))
    torch.testing.assert_close(terms.cross_entropy, msn(log_p, targets).cross_entropy)
    torch.testing.assert_close(terms.loss, terms.cross_entropy + 2.0 * torch.tensor(regulariser))


def test_msn_gradient_reaches_anchors_not_targets():
    generator = torch.Generator().manual_seed(2)
    anchors = torch.randn(2, 3, 4, generator=generator).log_softmax(-1).requires_grad_()
    targets = torch.randn(3, 4, generator=generator).softmax(-1).requires_grad_()
    msn(anchors, targets).loss.backward()
    assert anchors.grad is not None and anchors.grad.abs().sum() > 0 and targets.grad is None
    with pytest.raises(ValueError, match=r"\[V, n, K\]"):
        msn(anchors[0], targets)


def test_koleo_by_hand():
    # Three unit vectors 90 degrees apart in a row: each nearest neighbour is at distance sqrt(2).
    torch.testing.assert_close(koleo(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])),
                               torch.tensor(-0.5 * math.log(2)))
    # Normalised rows [1, 0], [0, 1], [1, 1]/sqrt(2): every nearest distance is sqrt(2 - sqrt(2)).
    torch.testing.assert_close(koleo(torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])),
                               torch.tensor(-0.5 * math.log(2 - math.sqrt(2))))
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(3), requires_grad=True)
    koleo(x).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert torch.isfinite(koleo(torch.ones(3, 2)))  # duplicates: eps keeps it finite
    with pytest.raises(ValueError, match="n >= 2"):
        koleo(torch.ones(1, 2))


def test_koleo_is_lower_for_spread_rows():
    clumped = torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.98, 0.2]])
    spread = torch.tensor([[1.0, 0.0], [-0.5, 0.87], [-0.5, -0.87]])
    assert koleo(spread) < koleo(clumped)


# ---------------------------------------------------------------- the objectives


def _build(key: str = "msn", seed: int = 0, **options):
    torch.manual_seed(seed)
    spec = ObjectiveSpec(backbone="vit-micro-cifar", image_size=SIZE, options={**SMALL, **options})
    return get_objective(key).build(spec)


def _batch(n: int = 4, seed: int = 5, focal_block: int | None = None) -> dict:
    generator = torch.Generator().manual_seed(seed)
    batch = {f"global{i}": torch.randn(n, 3, SIZE, SIZE, generator=generator) for i in range(2)}
    batch.update({f"local{i}": torch.randn(n, 3, FOCAL, FOCAL, generator=generator) for i in range(2)})
    batch["keep/global1"] = random_keep(4, SMALL["mask_ratio"], generator, count=n)
    if focal_block:
        batch.update({f"keep/local{i}": block_keep(2, focal_block, generator, count=n) for i in range(2)})
    return batch


def test_views_make_target_random_and_focal_crops_with_masks():
    objective = _build(focal_block=1)
    out = objective.views()(Image.new("RGB", (40, 40), (120, 30, 200)), None)
    assert sorted(out) == ["global0", "global1", "keep/global1", "keep/local0", "keep/local1", "local0", "local1"]
    assert out["global1"].shape == (3, SIZE, SIZE) and out["local0"].shape == (3, FOCAL, FOCAL)
    assert out["keep/global1"].shape == (kept_count(4, 0.25),) and out["keep/local0"].shape == (1,)
    assert "keep/local0" not in _build().views()(Image.new("RGB", (40, 40)), None)  # focal views whole by default


@pytest.mark.parametrize("key", ["msn", "pmsn"])
def test_forward_backward_and_state(key):
    objective = _build(key, focal_block=1)
    outputs = objective(_batch(focal_block=1))
    assert {"loss", "cross_entropy", "regulariser", "embedding_std", "prototypes_used"} <= set(outputs)
    assert all(torch.isfinite(value) for value in outputs.values())
    torch.testing.assert_close(outputs["loss"], outputs["cross_entropy"] + outputs["regulariser"])
    outputs["loss"].backward()
    for module in (objective.encoder, objective.projector):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert objective.prototypes.grad is not None and objective.prototypes.grad.abs().sum() > 0
    targets = [*objective.target_encoder.parameters(), *objective.target_projector.parameters()]
    assert all(p.grad is None for p in targets)
    state = objective.state_dict()
    assert "prototypes" in state and any(name.startswith("target_encoder.") for name in state)
    fresh = _build(key, seed=9, focal_block=1)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.prototypes, objective.prototypes)
    decay, no_decay = objective.parameter_groups(0.04)[:2]
    assert any(p is objective.prototypes for p in no_decay["params"])  # no weight decay, as the authors' optimiser
    assert not any(p is objective.prototypes for p in decay["params"])


def test_masked_patches_do_not_reach_the_loss():
    objective = _build()
    batch = _batch()
    loss = objective(batch)["loss"]
    changed = dict(batch, global1=batch["global1"].clone())
    for row, kept in enumerate(batch["keep/global1"]):
        for patch in dropped_indices(kept, 16).tolist():
            top, left = divmod(patch, 4)
            changed["global1"][row, :, 4 * top:4 * top + 4, 4 * left:4 * left + 4] = 9.0
    torch.testing.assert_close(objective(changed)["loss"], loss, rtol=0, atol=0)
    changed["global1"][:, :, :4, :4] += 1.0  # patch 0 is kept by some row: now the loss moves
    if (batch["keep/global1"] == 0).any():
        assert objective(changed)["loss"] != loss


def test_pmsn_shares_msn_cross_entropy():
    batch = _batch()
    first, second = _build("msn")(batch), _build("pmsn")(batch)
    torch.testing.assert_close(first["cross_entropy"], second["cross_entropy"])
    assert not torch.allclose(first["regulariser"], second["regulariser"])


def test_target_network_follows_the_momentum_schedule():
    objective = _build()
    with torch.no_grad():
        for p in objective.encoder.parameters():
            p.add_(0.1)
    online = next(objective.encoder.parameters()).detach().clone()
    before = next(objective.target_encoder.parameters()).detach().clone()
    objective.after_step(0, 10)
    m = momentum_at(1, 10, 0.996)
    torch.testing.assert_close(next(objective.target_encoder.parameters()), m * before + (1 - m) * online)


@pytest.mark.parametrize("options,match", [
    ({"mask_ratio": 1.0}, "mask_ratio"),
    ({"focal_crop_size": 6}, "focal_crop_size: image size 6 is not a multiple"),
    ({"focal_crop_size": 32}, "larger than the image size"),
    ({"focal_block": 3}, "focal_block 3 is larger"),
    ({"target_temperature": 0}, "target_temperature"),
    ({"num_prototypes": 1}, "num_prototypes must be >= 2"),
    ({"crop_scale": [0.5, 0.2]}, "crop_scale"),
    ({"augment": {"blurr": 1}}, "augment"),
    ({"momentum": 1.1}, "momentum"),
])
def test_option_errors_are_clear(options, match):
    with pytest.raises(ValueError, match=match):
        _build(**options)


def test_pmsn_option_error():
    with pytest.raises(ValueError, match="pmsn: power_law_exponent must be >= 0"):
        _build("pmsn", power_law_exponent=-1)


def _build_for_processes():
    return _build("msn", focal_block=1)


def _build_pmsn_for_processes():
    return _build("pmsn")


def _batch_for_processes(step: int = 0) -> dict:
    return _batch(n=8, seed=11 + step, focal_block=1)


def _plain_batch_for_processes(step: int = 0) -> dict:
    return _batch(n=8, seed=21 + step)


@pytest.mark.parametrize("build,batch", [(_build_for_processes, _batch_for_processes),
                                         (_build_pmsn_for_processes, _plain_batch_for_processes)])
def test_two_processes_equal_one_process(build, batch, tmp_path):
    """p_bar and the cross-entropy are global-batch means and Sinkhorn's sums are all-reduced, so 2 processes on
    halves give the loss of 1 process on the whole batch (rtol 1e-5) and its gradients; two steps, so the target
    network's EMA update is in the second."""
    assert_two_processes_match_one(build, batch, tmp_path, steps=2)
