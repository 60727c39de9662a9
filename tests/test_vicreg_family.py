"""VICReg, VICRegL, VIbCReg and TiCo: each loss against hand-worked numbers, IterNorm whitening, the VICRegL
matching and multi-crop geometry views, the objectives' heads, state and option errors, and two processes
against one on the concatenated batch."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from distributed_helpers import assert_two_processes_match_one
from PIL import Image

import trainer.objectives.tico  # registration of the four keys
import trainer.objectives.vibcreg
import trainer.objectives.vicreg
import trainer.objectives.vicregl  # noqa: F401
from trainer.data.crop_geometry import cell_centres
from trainer.data.pipeline import collate
from trainer.losses.tico import tico
from trainer.losses.vicreg import (
    covariance_penalty,
    nearest_matches,
    normalised_covariance_penalty,
    variance_hinge,
    vibcreg,
    vicreg,
    vicregl_global,
    vicregl_local,
)
from trainer.models.whitening import IterNorm
from trainer.objectives import ObjectiveSpec, get_objective
from trainer.objectives.diagnostics import COLLAPSE_THRESHOLD
from trainer.objectives.momentum import momentum_at

SIZE = 16
SMALL = {
    "vicreg": {"projection_dim": 16, "projection_hidden_dim": 32},
    "vibcreg": {"projection_dim": 16, "projection_hidden_dim": 32, "iternorm_groups": 4},
    "tico": {"projection_dim": 16, "projection_hidden_dim": 32},
    "vicregl": {"projection_dim": 16, "projection_hidden_dim": 32, "map_projection_dim": 8,
                "map_projection_hidden_dim": 16, "num_local_crops": 2, "local_crop_size": 8, "num_matches": [2, 1]},
}
TWO_VIEW_KEYS = ["vicreg", "vibcreg", "tico"]


def _build(key: str, seed: int = 0, **options):
    torch.manual_seed(seed)
    spec = ObjectiveSpec(backbone="cnn-small", image_size=SIZE, options={**SMALL[key], **options})
    return get_objective(key).build(spec)


def _views(n: int = 8, seed: int = 1, step: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed + 100 * step)
    return {f"view{i}": torch.randn(n, 3, SIZE, SIZE, generator=generator) for i in range(2)}


def _crops(n: int = 8, seed: int = 1, step: int = 0, local: int = 2) -> dict:
    """A VICRegL batch: pixels plus random boxes and flips for 2 global 16 px and ``local`` 8 px crops."""
    generator = torch.Generator().manual_seed(seed + 100 * step)
    batch = {}
    for key, size in [("global0", SIZE), ("global1", SIZE)] + [(f"local{i}", SIZE // 2) for i in range(local)]:
        corner = torch.rand(n, 2, generator=generator) * 0.5
        side = 0.3 + torch.rand(n, 2, generator=generator) * 0.5
        batch[key] = torch.randn(n, 3, size, size, generator=generator)
        batch[f"box_{key}"] = torch.cat([corner, (corner + side).clamp(max=1.0)], dim=1)
        batch[f"flip_{key}"] = (torch.rand(n, generator=generator) < 0.5).float()
    return batch


# ---- losses against hand-worked values ----
# Z1 columns: (0, 0.5, 1) -> mean 0.5, unbiased Var 0.25; (0, 0, 1.5) -> mean 0.5, Var 0.75.
#   Cov = ((-.5)(-.5) + 0 + (.5)(1)) / 2 = 0.375; correlation 0.75 / sqrt(0.5 * 1.5) = sqrt(0.75).
# Z2 columns: (1, 0, 0) -> mean 1/3, Var 1/3; (0, 0, 2) -> mean 2/3, Var 4/3.
#   Cov = ((2/3)(-2/3) + (-1/3)(-2/3) + (-1/3)(4/3)) / 2 = -1/3; correlation (-2/3) / sqrt(6/9 * 24/9) = -1/2.
# Z1 - Z2 = (-1, 0), (0.5, 0), (1, -0.5): MSE = 2.5 / 6.
Z1 = torch.tensor([[0.0, 0.0], [0.5, 0.0], [1.0, 1.5]])
Z2 = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
MSE = 2.5 / 6
V1 = ((1 - math.sqrt(0.25 + 1e-4)) + (1 - math.sqrt(0.75 + 1e-4))) / 2
V2 = ((1 - math.sqrt(1 / 3 + 1e-4)) + 0.0) / 2  # the second column's std sqrt(4/3) > 1: no hinge
C1 = 2 * 0.375 ** 2 / 2                          # two off-diagonal entries, / D = 2
C2 = 2 * (1 / 3) ** 2 / 2
R1 = 2 * 0.75 / 4                                # squared correlations, / D^2 = 4
R2 = 2 * 0.25 / 4


def test_variance_and_covariance_terms_by_hand():
    assert variance_hinge(Z1).item() == pytest.approx(V1, rel=1e-6)
    assert variance_hinge(Z2).item() == pytest.approx(V2, rel=1e-6)
    assert covariance_penalty(Z1).item() == pytest.approx(C1, rel=1e-6)
    assert covariance_penalty(Z2).item() == pytest.approx(C2, rel=1e-6)
    assert normalised_covariance_penalty(Z1).item() == pytest.approx(R1, rel=1e-5)
    assert normalised_covariance_penalty(Z2).item() == pytest.approx(R2, rel=1e-5)
    # The normalised term is blind to per-column scale; the plain covariance is not.
    scaled = Z1 * torch.tensor([10.0, 0.1])
    assert normalised_covariance_penalty(scaled).item() == pytest.approx(R1, rel=1e-5)
    assert covariance_penalty(scaled).item() == pytest.approx(2 * (0.375 * 1.0) ** 2 / 2, rel=1e-5)
    assert variance_hinge(Z1 * 100).item() == 0.0  # every std above the target


def test_vicreg_by_hand():
    terms = vicreg(Z1, Z2)
    assert terms.invariance.item() == pytest.approx(MSE, rel=1e-6)
    assert terms.variance.item() == pytest.approx((V1 + V2) / 2, rel=1e-6)
    assert terms.covariance.item() == pytest.approx(C1 + C2, rel=1e-6)
    assert terms.loss.item() == pytest.approx(25 * MSE + 25 * (V1 + V2) / 2 + (C1 + C2), rel=1e-6)
    weighted = vicreg(Z1, Z2, invariance_weight=1.0, variance_weight=2.0, covariance_weight=3.0)
    assert weighted.loss.item() == pytest.approx(MSE + (V1 + V2) + 3 * (C1 + C2), rel=1e-6)


def test_vicreg_is_zero_for_identical_spread_out_decorrelated_views():
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]]) * 3 + 5  # std 3.46, Cov 0
    assert vicreg(z, z.clone()).loss.item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        vicreg(z, z[:, :1])
    with pytest.raises(ValueError):
        variance_hinge(z[:1])


def test_vibcreg_by_hand():
    terms = vibcreg(Z1, Z2)
    assert terms.variance.item() == pytest.approx(V1 + V2, rel=1e-6)  # summed over the views (authors' code)
    assert terms.covariance.item() == pytest.approx(R1 + R2, rel=1e-5)
    assert terms.loss.item() == pytest.approx(25 * MSE + 25 * (V1 + V2) + 200 * (R1 + R2), rel=1e-5)


def test_tico_by_hand():
    # Normalised: z1 -> (0.6, 0.8), (1, 0); z2 -> (0.8, 0.6), (0, 1): cosines 0.96 and 0, invariance -0.48.
    # B = mean u u^T = ([[.36, .48], [.48, .64]] + [[1, 0], [0, 0]]) / 2 = [[.68, .24], [.24, .32]].
    z1, z2 = torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([[4.0, 3.0], [0.0, 2.0]])
    b = torch.tensor([[0.68, 0.24], [0.24, 0.32]])
    # From C = 0: C_t = 0.1 B; u^T B u = .36 * .68 + 2 * .48 * .24 + .64 * .32 = 0.68 for u1, and .68 for u2.
    first = tico(z1, z2, torch.zeros(2, 2), rho=8.0, beta=0.9)
    assert first.invariance.item() == pytest.approx(-0.48, rel=1e-6)
    assert first.covariance.item() == pytest.approx(0.068, rel=1e-5)
    assert first.loss.item() == pytest.approx(-0.48 + 8 * 0.068, rel=1e-5)
    assert torch.allclose(first.new_covariance, 0.1 * b, atol=1e-6)
    # From C = I: C_t = 0.9 I + 0.1 B = [[.968, .024], [.024, .932]]; u1^T C_t u1 = .34848 + .02304 + .59648.
    second = tico(z1, z2, torch.eye(2), rho=8.0, beta=0.9)
    assert second.covariance.item() == pytest.approx(0.968, rel=1e-5)
    assert second.loss.item() == pytest.approx(-0.48 + 8 * 0.968, rel=1e-5)
    assert not second.new_covariance.requires_grad


def test_tico_gradient_flows_to_the_online_side_only():
    z1 = torch.randn(6, 4, requires_grad=True)
    z2 = torch.randn(6, 4, requires_grad=True)
    tico(z1, z2.detach(), torch.zeros(4, 4)).loss.backward()
    assert z1.grad is not None and z1.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="covariance"):
        tico(z1, z2, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="beta"):
        tico(z1, z2, torch.zeros(4, 4), beta=1.0)


def test_vicregl_global_by_hand():
    # Two crops: invariance over the pairs (0, 1) and (1, 0) is the MSE; variance and covariance averaged over
    # the crops (so the covariance is half of VICReg's sum).
    terms = vicregl_global([Z1, Z2])
    assert terms.loss.item() == pytest.approx(25 * MSE + 25 * (V1 + V2) / 2 + (C1 + C2) / 2, rel=1e-6)
    # A third crop equal to Z2: pairs (0,1), (0,2), (1,0), (1,2) have MSEs m, m, m, 0.
    three = vicregl_global([Z1, Z2, Z2.clone()])
    assert three.invariance.item() == pytest.approx(3 * MSE / 4, rel=1e-6)
    assert three.variance.item() == pytest.approx((V1 + 2 * V2) / 3, rel=1e-6)


def test_nearest_matches_by_hand():
    # a's cells at x = 0, 1, 2; b's at x = 0.9, 2.2. Nearest: a0 -> b0 (0.9), a1 -> b0 (0.1), a2 -> b1 (0.2).
    where_a = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]]])
    where_b = torch.tensor([[[0.9, 0.0], [2.2, 0.0]]])
    features_a = torch.tensor([[[10.0], [11.0], [12.0]]])
    features_b = torch.tensor([[[20.0], [21.0]]])
    kept, partners = nearest_matches(features_a, features_b, torch.cdist(where_a, where_b), 2)
    assert kept.flatten().tolist() == [11.0, 12.0]      # the two closest pairs, in cell order
    assert partners.flatten().tolist() == [20.0, 21.0]
    everything, nearest = nearest_matches(features_a, features_b, torch.cdist(where_a, where_b), None)
    assert everything.flatten().tolist() == [10.0, 11.0, 12.0] and nearest.flatten().tolist() == [20.0, 20.0, 21.0]
    assert nearest_matches(features_a, features_b, torch.cdist(where_a, where_b), 99)[0].shape == (1, 3, 1)


def test_vicregl_local_by_hand_on_one_cell_maps():
    # One cell per map: both matchings pair the cells, both directions give (MSE, (va + vb) / 2, (ca + cb) / 2),
    # and the feature and location matchings add: twice the per-matching terms.
    maps_a, maps_b = Z1[:, None, :], Z2[:, None, :]
    centres = torch.full((3, 1, 2), 0.5)
    terms = vicregl_local(maps_a, maps_b, centres, centres)
    assert terms.invariance.item() == pytest.approx(2 * MSE, rel=1e-6)
    assert terms.loss.item() == pytest.approx(2 * (25 * MSE + 25 * (V1 + V2) / 2 + (C1 + C2) / 2), rel=1e-6)


def test_vicregl_local_matches_by_location_not_by_cell_index():
    generator = torch.Generator().manual_seed(0)
    maps_a = torch.randn(6, 4, 3, generator=generator)
    centres_a = torch.rand(6, 4, 2, generator=generator)
    permutation = torch.tensor([2, 0, 3, 1])
    # b shows a's cells in another order at the same places: every location match finds the same feature.
    kwargs = {"num_matches": (4, 4), "l2_num_matches": (None, None)}
    same = vicregl_local(maps_a, maps_a[:, permutation], centres_a, centres_a[:, permutation], **kwargs)
    assert same.invariance.item() == pytest.approx(0.0, abs=1e-6)
    shuffled_places = vicregl_local(maps_a, maps_a[:, permutation], centres_a, centres_a, **kwargs)
    assert shuffled_places.invariance.item() > 0.1  # locations that disagree with the features


# ---- IterNorm ----

def test_iternorm_with_one_feature_per_group_is_batch_standardisation():
    norm = IterNorm(2, num_groups=2, iterations=3, eps=0.0)
    x = torch.tensor([[1.0, 10.0], [3.0, 14.0]])  # means 2, 12; biased variances 1, 4
    assert torch.allclose(norm(x), torch.tensor([[-1.0, -1.0], [1.0, 1.0]]), atol=1e-6)


def test_iternorm_whitens_each_group():
    generator = torch.Generator().manual_seed(0)
    mixing = torch.tensor([[1.0, 0.6, 0.0], [0.0, 0.8, 0.3], [0.0, 0.0, 0.7]])
    x = torch.randn(512, 3, generator=generator) @ mixing + 2.0
    x = torch.cat([x, 3 * x], dim=1)  # two groups of 3: each whitened on its own
    # Eight iterations converge here; many more amplify float32 rounding (the uncoupled Newton iteration is
    # unstable once converged), which is why IterNorm uses a handful.
    norm = IterNorm(6, num_groups=2, iterations=8, eps=0.0)
    out = norm(x)
    for group in (out[:, :3], out[:, 3:]):
        centred = group - group.mean(0)
        assert torch.allclose(centred.t() @ centred / 512, torch.eye(3), atol=1e-4)
    # Against ZCA whitening Sigma^{-1/2} (x - mean) of one group, from the eigen-decomposition.
    centred = x[:, :3] - x[:, :3].mean(0)
    values, vectors = torch.linalg.eigh(centred.t() @ centred / 512)
    zca = centred @ (vectors @ torch.diag(values.rsqrt()) @ vectors.t())
    assert torch.allclose(out[:, :3], zca, atol=1e-4)
    # Five iterations (VIbCReg's) already remove most of the correlation.
    few = IterNorm(6, num_groups=2, iterations=5)(x)[:, :3]
    correlation = torch.corrcoef(few.t())
    assert correlation[0, 1].abs() < 0.5 * torch.corrcoef(x[:, :3].t())[0, 1].abs()


def test_iternorm_state_gradients_and_errors():
    norm = IterNorm(4, num_groups=2, iterations=5)
    x = torch.randn(16, 4, requires_grad=True)
    norm(x).pow(3).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and norm.weight.grad is not None
    assert not torch.equal(norm.running_whitening, torch.eye(2).repeat(2, 1, 1))  # running averages moved
    norm.eval()
    y = norm(torch.randn(1, 4))  # eval: running statistics, one row is fine
    assert y.shape == (1, 4)
    assert set(norm.state_dict()) == {"weight", "bias", "running_mean", "running_whitening"}
    with pytest.raises(ValueError, match="divide"):
        IterNorm(6, num_groups=4)


# ---- objectives ----

def test_vicreg_objective_loss_and_expander():
    objective = _build("vicreg", covariance_weight=2.0)
    batch = _views(8)
    outputs = objective(batch)
    with torch.no_grad():
        z1, z2 = (objective.projector(objective.encoder.encode_image(batch[v])) for v in ("view0", "view1"))
    assert torch.allclose(outputs["loss"], vicreg(z1, z2, covariance_weight=2.0).loss, rtol=1e-5)
    linears = [m for m in objective.projector if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3 and linears[-1].bias is None and linears[-1].out_features == 16
    assert {"invariance", "variance", "covariance", "embedding_std"} <= set(outputs)
    outputs["loss"].backward()
    assert objective.encoder.backbone.features[0].weight.grad is not None


def test_vibcreg_objective_whitens_the_projections():
    objective = _build("vibcreg")
    batch = _views(8)
    outputs = objective(batch)
    assert isinstance(objective.whitening, IterNorm) and objective.whitening.num_groups == 4
    with torch.no_grad():  # training mode: each view whitened by its own batch statistics, as in forward
        h1, h2 = (objective.projector(objective.encoder.encode_image(batch[v])) for v in ("view0", "view1"))
        z1, z2 = objective.whitening(h1), objective.whitening(h2)
    assert torch.allclose(outputs["loss"], vibcreg(z1, z2).loss, rtol=1e-4)
    assert "whitening.running_whitening" in objective.state_dict()
    outputs["loss"].backward()
    assert objective.whitening.weight.grad is not None and objective.projector[0].weight.grad is not None


def test_tico_objective_covariance_state_and_target():
    objective = _build("tico", momentum=0.9)
    batch = _views(8)
    assert torch.count_nonzero(objective.covariance) == 0
    outputs = objective(batch)
    with torch.no_grad():
        online = objective.projector(objective.encoder.encode_image(batch["view0"]))
        target = objective.target_projector(objective.target_encoder.encode_image(batch["view1"]))
    expected = tico(online, target, torch.zeros(16, 16))
    assert torch.allclose(outputs["loss"], expected.loss, rtol=1e-5)
    outputs["loss"].backward()
    assert all(p.grad is None for p in objective.target_encoder.parameters())
    assert torch.count_nonzero(objective.covariance) == 0  # C is stored after the step, not in forward
    target_before = objective.target_projector[0].weight.clone()
    with torch.no_grad():
        objective.projector[0].weight.add_(1.0)
    objective.after_step(0, 10)
    assert torch.allclose(objective.covariance, expected.new_covariance, atol=1e-6)
    m = momentum_at(1, 10, 0.9)
    assert torch.allclose(objective.target_projector[0].weight,
                          m * target_before + (1 - m) * objective.projector[0].weight, atol=1e-6)
    # The buffer travels with the checkpoint.
    state = objective.state_dict()
    assert torch.equal(state["covariance"], objective.covariance)
    fresh = _build("tico", seed=5, momentum=0.9)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.covariance, objective.covariance)
    objective.after_step(1, 10)  # no forward since the last step: nothing pending, the buffer stays
    assert torch.allclose(objective.covariance, expected.new_covariance, atol=1e-6)


def test_vicregl_objective_views_and_forward():
    objective = _build("vicregl")
    views = objective.views()
    generator = np.random.default_rng(0)
    images = [Image.fromarray(generator.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(6)]
    batch = collate([views(image, None) for image in images])
    assert views.keys() == ["global0", "global1", "local0", "local1"]
    assert batch["global0"].shape == (6, 3, SIZE, SIZE) and batch["local1"].shape == (6, 3, 8, 8)
    assert batch["box_local0"].shape == (6, 4) and batch["flip_global1"].shape == (6,)
    box = batch["box_local0"]
    area = (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])
    assert (area <= 0.4 + 0.05).all()  # local crops: scale 0.08-0.4 (rounded to whole pixels)
    outputs = objective(batch)
    assert torch.isfinite(outputs["loss"])
    expected = 0.75 * outputs["global_loss"] + 0.25 * outputs["local_loss"]
    assert torch.allclose(outputs["loss"].detach(), expected, rtol=1e-5)
    outputs["loss"].backward()
    for module in (objective.encoder, objective.projector, objective.map_projector):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_vicregl_local_term_uses_the_crops_geometry():
    objective = _build("vicregl", alpha=0.0)
    assert not hasattr(objective, "projector") and hasattr(objective, "map_projector")
    batch = _crops(8)
    with torch.no_grad():  # the same pixels (and batch statistics) twice: only the geometry differs
        first = objective(batch)["local_invariance"]
        mirrored = objective(dict(batch, flip_global0=1 - batch["flip_global0"]))["local_invariance"]
        assert not torch.allclose(first, mirrored, rtol=1e-3)
        fmap = objective.encoder.backbone.features(batch["global0"])
        assert fmap.shape[-2:] == (2, 2)  # cnn-small: 16 px -> a 2x2 map
    centres = cell_centres(batch["box_global0"][:1], torch.ones(1), 2, 2)
    x0, _, x1, _ = batch["box_global0"][0].tolist()
    assert centres[0, 0, 0].item() == pytest.approx(x0 + 0.75 * (x1 - x0))  # a mirrored crop's first column
    assert not hasattr(_build("vicregl", alpha=1.0), "map_projector")


@pytest.mark.parametrize("key", TWO_VIEW_KEYS)
def test_collapse_is_reported_as_embedding_std(key):
    objective = _build(key)
    spread = objective(_views(16))["embedding_std"].item()
    assert spread > 0.3
    same = torch.randn(1, 3, SIZE, SIZE).expand(16, -1, -1, -1)
    collapsed = objective({"view0": same, "view1": same.clone()})["embedding_std"].item()
    assert collapsed < COLLAPSE_THRESHOLD


@pytest.mark.parametrize("key,options,match", [
    ("vicreg", {"variance_weight": -1.0}, "variance_weight"),
    ("vicreg", {"eps": "small"}, "eps"),
    ("vicreg", {"second_view_augment": {"sharpen": 1.0}}, "sharpen"),
    ("vibcreg", {"iternorm_groups": 3}, "iternorm_groups"),
    ("vibcreg", {"iternorm_iterations": 0}, "iternorm_iterations"),
    ("tico", {"beta": 1.0}, "beta"),
    ("tico", {"momentum": 0.999, "final_momentum": 0.99}, "momentum"),
    ("vicregl", {"alpha": 1.5}, "alpha"),
    ("vicregl", {"num_matches": [3]}, "num_matches"),
    ("vicregl", {"local_crop_scale": [0.5, 0.2]}, "local_crop_scale"),
    ("vicregl", {"augment": {"solarize_prob": 0.2}}, "solarize_prob"),
])
def test_bad_options_are_clear_errors(key, options, match):
    with pytest.raises(ValueError, match=match):
        _build(key, **options)
    assert _build("tico", rho="2e1").options.rho == 20.0  # YAML's string for an exponent without a dot


# ---- two processes against one ----

def _build_vicreg():  # module level: the two-process helper pickles these
    return _build("vicreg")


def _build_vibcreg():
    return _build("vibcreg")


def _build_tico():
    return _build("tico", momentum=0.9)


def _build_vicregl():
    return _build("vicregl")


def _two_views(step: int = 0) -> dict:
    return _views(8, step=step)


def _vicregl_crops(step: int = 0) -> dict:
    return _crops(8, step=step)


@pytest.mark.parametrize("build,make_batch,steps,atol", [
    (_build_vicreg, _two_views, 1, 1e-5),
    (_build_vibcreg, _two_views, 1, 1e-3),  # weights 25 / 25 / 200: gradients up to ~50, atol 2e-5 of that
    (_build_tico, _two_views, 2, 1e-5),
    (_build_vicregl, _vicregl_crops, 1, 1e-5),
])
def test_two_processes_equal_one_process(build, make_batch, steps, atol, tmp_path):
    """The variance / covariance (vicreg, vicregl), IterNorm's whitening (vibcreg) and TiCo's covariance EMA
    (used by the second step) are global-batch quantities: every process gathers the batch first. Losses agree
    to rtol 1e-5 (the helper's fixed check); gradients to its default rtol 1e-3 (float reduction order moves
    them by ~1e-5 of their scale)."""
    assert_two_processes_match_one(build, make_batch, tmp_path, steps=steps, atol=atol)


def test_gathered_losses_equal_one_batch_formula():
    """What the objectives gather is what the losses need: splitting the rows changes the statistics."""
    generator = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(8, 4, generator=generator), torch.randn(8, 4, generator=generator)
    whole = vicreg(z1, z2).loss
    halves = (vicreg(z1[:4], z2[:4]).loss + vicreg(z1[4:], z2[4:]).loss) / 2
    assert not torch.allclose(whole, halves)
    assert F.mse_loss(z1, z2).item() == pytest.approx(vicreg(z1, z2).invariance.item())
