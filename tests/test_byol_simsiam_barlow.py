"""BYOL, SimSiam and Barlow Twins: the three losses against hand-worked values, the objectives' stop-gradients,
momentum target and asymmetric views, collapse reporting, checkpoints, two processes against one, and short
learning runs on CIFAR-10."""
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import trainer.objectives.barlow_twins  # noqa: F401  (registration)
import trainer.objectives.byol  # noqa: F401
import trainer.objectives.simsiam  # noqa: F401
from distributed_helpers import assert_two_processes_match_one
from trainer.data.views import AugmentConfig, TwoViews
from trainer.losses.noncontrastive import barlow_twins, byol_loss, negative_cosine
from trainer.objectives import ObjectiveSpec, get_objective
from trainer.objectives.diagnostics import COLLAPSE_THRESHOLD
from trainer.objectives.momentum import momentum_at

SIZE = 16
SMALL = {"byol": {"projection_dim": 16, "projection_hidden_dim": 32, "predictor_hidden_dim": 32},
         "simsiam": {"projection_dim": 16, "projection_hidden_dim": 32, "predictor_hidden_dim": 8},
         "barlow_twins": {"projection_dim": 16, "projection_hidden_dim": 32}}
KEYS = list(SMALL)


def _build(key: str, seed: int = 0, **options):
    torch.manual_seed(seed)
    spec = ObjectiveSpec(backbone="cnn-small", image_size=SIZE, options={**SMALL[key], **options})
    return get_objective(key).build(spec)


def _views(n: int = 8, seed: int = 1, step: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed + 100 * step)
    return {f"view{i}": torch.randn(n, 3, SIZE, SIZE, generator=generator) for i in range(2)}


# ---- losses against hand-worked values ----

P = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
Z = torch.tensor([[4.0, 3.0], [0.0, 2.0]])  # cosines: (12 + 12) / 25 = 0.96 and 0


def test_negative_cosine_by_hand():
    assert negative_cosine(P, Z).item() == pytest.approx(-(0.96 + 0.0) / 2)
    assert negative_cosine(P, 7 * P).item() == pytest.approx(-1.0)  # scale-free


def test_byol_loss_is_normalised_mse_by_hand():
    # Row 0: (0.6, 0.8) - (0.8, 0.6) = (-0.2, 0.2), squared norm 0.08 = 2 - 2 * 0.96; row 1: orthogonal, 2.
    assert byol_loss(P, Z).item() == pytest.approx((0.08 + 2.0) / 2)
    assert byol_loss(P, 3 * P).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(P, -P).item() == pytest.approx(4.0)


def test_barlow_twins_by_hand():
    # Columns standardised over N = 3 with the biased variance:
    #   z1[:, 0] = 1, 2, 3 -> (-a, 0, a), a = sqrt(3/2);   z1[:, 1] = 0, 0, 3 -> (-1, -1, 2) / sqrt(2)
    #   z2[:, 0] = 3, 2, 1 -> (a, 0, -a);                  z2[:, 1] = 2, 5, 2 -> (-1, 2, -1) / sqrt(2)
    # C = z1_hat^T z2_hat / 3: C00 = -2a^2/3 = -1, C01 = (a - a) / (3 sqrt 2) = 0,
    #   C10 = (-a - 2a) / (3 sqrt 2) = -sqrt(3)/2, C11 = (1 - 2 - 2) / 6 = -1/2.
    # Loss = (1 + 1)^2 + (1 + 1/2)^2 + lambda (0 + 3/4) = 6.25 + 0.75 lambda.
    z1 = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 3.0]])
    z2 = torch.tensor([[3.0, 2.0], [2.0, 5.0], [1.0, 2.0]])
    assert barlow_twins(z1, z2).item() == pytest.approx(6.25 + 0.75 * 5.1e-3, rel=1e-4)
    assert barlow_twins(z1, z2, lambd=2.0).item() == pytest.approx(7.75, rel=1e-4)
    # Per-dimension affine maps (positive scales) leave the standardised embeddings and the loss unchanged.
    assert barlow_twins(z1 * torch.tensor([5.0, 0.1]) + 3.0, z2 - 7.0).item() == pytest.approx(6.25 + 0.75 * 5.1e-3, rel=1e-4)


def test_barlow_twins_is_zero_for_identical_decorrelated_views():
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]]) * 4 + 2  # C = identity
    assert barlow_twins(z, z.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert barlow_twins(z, z[:, [1, 0]]).item() == pytest.approx(2 * 1.0 + 5.1e-3 * 2 * 1.0, rel=1e-4)  # swapped dims


def test_barlow_twins_equals_the_papers_batch_norm_formulation():
    generator = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(32, 6, generator=generator) * 3 + 1, torch.randn(32, 6, generator=generator)
    bn = torch.nn.BatchNorm1d(6, affine=False).train()
    c = bn(z1).t() @ bn(z2) / 32
    on = (torch.diagonal(c) - 1).pow(2).sum()
    off = (c - torch.diag(torch.diagonal(c))).pow(2).sum()
    assert barlow_twins(z1, z2, 0.3).item() == pytest.approx((on + 0.3 * off).item(), rel=1e-5)
    with pytest.raises(ValueError):
        barlow_twins(z1, z2[:, :5])
    with pytest.raises(ValueError):
        barlow_twins(z1[:1], z2[:1])


# ---- objectives ----

def test_byol_loss_is_symmetric_against_a_no_grad_target():
    objective = _build("byol")
    batch = _views(8)
    outputs = objective(batch)
    with torch.no_grad():
        p1, p2 = (objective.predictor(objective.projector(objective.encoder.encode_image(batch[v]))) for v in ("view0", "view1"))
        t1, t2 = (objective.target_projector(objective.target_encoder.encode_image(batch[v])) for v in ("view0", "view1"))
    expected = (2 - 2 * F.cosine_similarity(p1, t2)).mean() + (2 - 2 * F.cosine_similarity(p2, t1)).mean()
    assert torch.allclose(outputs["loss"], expected, rtol=1e-5)
    outputs["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in objective.target_encoder.parameters())
    assert all(p.grad is not None for p in objective.predictor.parameters())
    assert sum(p.numel() for p in objective.target_projector.parameters()) == sum(p.numel() for p in objective.projector.parameters())


def test_byol_target_follows_the_cosine_momentum_schedule():
    objective = _build("byol", momentum=0.99)
    target_before = objective.target_projector[0].weight.clone()
    assert torch.equal(target_before, objective.projector[0].weight)  # the target starts as the online copy
    with torch.no_grad():
        objective.projector[0].weight.add_(1.0)
    objective.after_step(4, 10)
    m = momentum_at(5, 10, 0.99)
    assert m == pytest.approx(1 - 0.01 * (math.cos(math.pi / 2) + 1) / 2)
    expected = m * target_before + (1 - m) * objective.projector[0].weight
    assert torch.allclose(objective.target_projector[0].weight, expected)
    objective.after_step(9, 10)  # the last step: momentum 1, the target stays put
    frozen = objective.target_projector[0].weight.clone()
    objective.after_step(9, 10)
    assert torch.equal(objective.target_projector[0].weight, frozen)


def test_simsiam_stops_the_gradient_on_the_projection_side():
    objective = _build("simsiam")
    batch = _views(8)
    outputs = objective(batch)
    outputs["loss"].backward()
    got = {n: p.grad.clone() for n, p in objective.named_parameters()}
    objective.zero_grad()

    def symmetric(detach: bool):
        z1, z2 = (objective.projector(objective.encoder.encode_image(batch[v])) for v in ("view0", "view1"))
        p1, p2 = objective.predictor(z1), objective.predictor(z2)
        t1, t2 = (z1.detach(), z2.detach()) if detach else (z1, z2)
        return -0.5 * F.cosine_similarity(p1, t2).mean() - 0.5 * F.cosine_similarity(p2, t1).mean()

    expected = symmetric(detach=True)
    assert torch.allclose(outputs["loss"], expected, rtol=1e-5)
    expected.backward()
    assert all(torch.allclose(got[n], p.grad, rtol=1e-4, atol=1e-7) for n, p in objective.named_parameters())
    objective.zero_grad()
    symmetric(detach=False).backward()  # without the stop-gradient the encoder's gradient differs
    assert (got["encoder.backbone.features.0.weight"] - objective.encoder.backbone.features[0].weight.grad).abs().max() > 1e-6
    head = list(objective.projector)
    assert isinstance(head[-1], torch.nn.BatchNorm1d) and not head[-1].affine and head[-2].bias is None
    assert len([m for m in head if isinstance(m, torch.nn.Linear)]) == 3
    assert objective.predictor[0].out_features == 8 and objective.predictor[-1].out_features == 16  # bottleneck


def test_barlow_twins_objective_loss_and_projector():
    objective = _build("barlow_twins", lambd=0.1)
    batch = _views(8)
    outputs = objective(batch)
    with torch.no_grad():
        z1, z2 = (objective.projector(objective.encoder.encode_image(batch[v])) for v in ("view0", "view1"))
    assert torch.allclose(outputs["loss"], barlow_twins(z1, z2, 0.1), rtol=1e-5)
    linears = [m for m in objective.projector if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3 and linears[-1].bias is None and linears[-1].out_features == 16


@pytest.mark.parametrize("key", KEYS)
def test_collapse_is_reported_as_embedding_std(key):
    objective = _build(key)
    spread = objective(_views(16))["embedding_std"].item()
    assert spread > 0.3
    same = torch.randn(1, 3, SIZE, SIZE).expand(16, -1, -1, -1)  # every image identical: a collapsed output
    collapsed = objective({"view0": same, "view1": same.clone()})["embedding_std"].item()
    assert collapsed < COLLAPSE_THRESHOLD


@pytest.mark.parametrize("key,options,match", [
    ("byol", {"momentum": 1.2}, "momentum"),
    ("byol", {"momentum": "fast"}, "momentum"),
    ("byol", {"second_view_augment": {"sharpen": 1.0}}, "sharpen"),
    ("simsiam", {"predictor_hidden_dim": 0}, "predictor_hidden_dim"),
    ("simsiam", {"temperature": 0.1}, "unknown option"),
    ("barlow_twins", {"lambd": -1.0}, "lambd"),
])
def test_bad_options_are_clear_errors(key, options, match):
    with pytest.raises(ValueError, match=match):
        _build(key, **options)
    assert _build("barlow_twins", lambd="5e-3").options.lambd == 5e-3  # YAML's string for an exponent without a dot


def test_byol_views_are_asymmetric_with_solarize_on_view1():
    byol = _build("byol", augment={"blur_prob": 1.0}, second_view_augment={"blur_prob": 0.1, "solarize_prob": 0.2})
    views = byol.views()
    assert views.transform is not views.second_transform
    names = [type(t).__name__ for t in views.second_transform.transforms]
    assert "RandomSolarize" in names and "RandomSolarize" not in [type(t).__name__ for t in views.transform.transforms]
    simsiam_views = _build("simsiam").views()
    assert simsiam_views.second_transform is simsiam_views.transform
    # Deterministic pipeline: full crop, no flip or colour; view1 solarised with probability 1.
    plain = AugmentConfig(crop_scale=(1.0, 1.0), flip=0.0, jitter_prob=0.0, grayscale_prob=0.0)
    solarised = AugmentConfig(crop_scale=(1.0, 1.0), flip=0.0, jitter_prob=0.0, grayscale_prob=0.0, solarize_prob=1.0)
    pixels = torch.arange(SIZE * SIZE * 3, dtype=torch.uint8).view(SIZE, SIZE, 3)
    image = Image.fromarray(pixels.numpy())
    out = TwoViews(SIZE, [0.0] * 3, [1.0] * 3, plain, solarised)(image, None)
    x = pixels.permute(2, 0, 1).float()
    assert torch.allclose(out["view0"], x / 255, atol=1e-6)
    assert torch.allclose(out["view1"], torch.where(x >= 128, 255 - x, x) / 255, atol=1e-6)


@pytest.mark.parametrize("key", KEYS)
def test_state_survives_state_dict_save_and_load(key, tmp_path):
    objective = _build(key)
    for step in range(2):
        objective(_views(8, step=step))["loss"].backward()
        with torch.no_grad():
            for p in objective.encoder.parameters():
                p.add_(0.01 * torch.randn_like(p))
        objective.after_step(step, 10)
    torch.save(objective.state_dict(), tmp_path / "state.pt")
    restored = _build(key, seed=7)
    restored.load_state_dict(torch.load(tmp_path / "state.pt"))
    state, loaded = objective.state_dict(), restored.state_dict()
    assert all(torch.equal(state[n], loaded[n]) for n in state)
    if key == "byol":  # the EMA target has moved away from the online network and is in the checkpoint
        target = [n for n in state if n.startswith("target_encoder.")]
        assert target and any(not torch.equal(state[n], state[n.replace("target_", "", 1)]) for n in target)
    objective.eval(), restored.eval()
    batch = _views(8, step=5)
    assert torch.allclose(objective(batch)["loss"], restored(batch)["loss"])


def _global_batch(step: int = 0) -> dict:
    return _views(16, step=step)


def _build_byol():  # module level: the two-process helper pickles these
    return _build("byol")


def _build_barlow_twins():
    return _build("barlow_twins")


# Barlow Twins' gradients reach ~20 at this size (D = 16 summed squares); float32 rounding of the two
# summation orders then differs by up to ~5e-5 (2e-6 of the largest), so its absolute tolerance is 1e-4.
# SimSiam is left out: its cross-process parts (gathered p and z, global BN) are BYOL's without the target.
@pytest.mark.parametrize("build,steps,atol", [(_build_barlow_twins, 1, 1e-4), (_build_byol, 2, 1e-5)])
def test_two_processes_equal_one_process(build, steps, atol, tmp_path):
    """barlow_twins: the cross-correlation of the gathered global batch; byol: gathered predictions and
    targets, global BN in the target network, the EMA between steps."""
    assert_two_processes_match_one(build, _global_batch, tmp_path, steps=steps, atol=atol)
