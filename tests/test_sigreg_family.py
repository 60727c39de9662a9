"""LeJEPA and VISReg: the Epps-Pulley statistic, SIGReg and VISReg's centre / scale / shape terms against
hand-worked numbers and closed forms, the objectives' multi-crop views, step-seeded directions, checkpoints,
option errors, and two processes against one."""
import math

import pytest
import torch
import yaml
from distributed_helpers import assert_two_processes_match_one

import trainer.objectives.lejepa  # (registration)
import trainer.objectives.visreg  # noqa: F401
from trainer.config import recipe_path
from trainer.losses.sigreg import (
    epps_pulley,
    epps_pulley_knots,
    gaussian_quantiles,
    lejepa,
    lejepa_prediction,
    random_directions,
    sigreg,
    visreg,
    visreg_center,
    visreg_scale,
    visreg_shape,
)
from trainer.objectives import ObjectiveSpec, get_objective

SIZE, LOCAL = 16, 8
SMALL = {"projection_dim": 8, "projection_hidden_dim": 16, "num_slices": 32, "num_local_crops": 2,
         "local_crop_size": LOCAL}


def _build(key: str, seed: int = 0, **options):
    torch.manual_seed(seed)
    spec = ObjectiveSpec(backbone="cnn-small", image_size=SIZE, options={**SMALL, **options})
    return get_objective(key).build(spec)


def _crops(n: int = 8, seed: int = 1, step: int = 0, globals_: int = 2, local: int = 2) -> dict:
    generator = torch.Generator().manual_seed(seed + 100 * step)
    batch = {f"global{i}": torch.randn(n, 3, SIZE, SIZE, generator=generator) for i in range(globals_)}
    batch.update({f"local{i}": torch.randn(n, 3, LOCAL, LOCAL, generator=generator) for i in range(local)})
    return batch


# ---------------------------------------------------------------- Epps-Pulley and SIGReg, by hand


def test_three_knot_trapezoid_folds_the_symmetric_range_and_carries_the_gaussian_window():
    t, weights = epps_pulley_knots(knots=3, t_max=3.0)
    assert torch.allclose(t, torch.tensor([0.0, 1.5, 3.0]))
    # trapezoid on [-3, 3] with step 1.5: [.75, 1.5, 1.5, 1.5, .75]; folded onto t >= 0: [1.5, 3, 1.5]
    window = torch.tensor([1.0, math.exp(-1.125), math.exp(-4.5)])
    assert torch.allclose(weights, torch.tensor([1.5, 3.0, 1.5]) * window)


def test_epps_pulley_of_a_two_sample_batch_by_hand():
    # x = {0, 1}: ECF(t) = ((1 + cos t) / 2, sin t / 2); |ECF - exp(-t^2/2)|^2 at t = 0 is 0.
    # T = N * sum_k w_k err_k with N = 2, w = [1.5, 3, 1.5] * exp(-t^2 / 2).
    def err(t):
        return ((1 + math.cos(t)) / 2 - math.exp(-t * t / 2)) ** 2 + (math.sin(t) / 2) ** 2

    expected = 2 * (3.0 * math.exp(-1.125) * err(1.5) + 1.5 * math.exp(-4.5) * err(3.0))
    assert abs(expected - 0.5712) < 1e-3  # worked by hand: 2 * (0.97396 * 0.29315 + 0.01666 * 0.00502)
    t, weights = epps_pulley_knots(3, 3.0)
    got = epps_pulley(torch.tensor([[0.0], [1.0]]), t, weights)
    assert got.shape == (1,)
    assert torch.allclose(got, torch.tensor([expected]), rtol=1e-6)


def test_epps_pulley_converges_to_its_closed_form():
    # T = N [ sqrt(2 pi) / N^2 sum_jk exp(-(x_j - x_k)^2 / 2) - 2 sqrt(pi) / N sum_j exp(-x_j^2 / 4) + sqrt(2 pi / 3) ]
    x = torch.tensor([-1.3, -0.2, 0.4, 0.9, 2.1], dtype=torch.float64)
    n = len(x)
    pairs = torch.exp(-0.5 * (x[:, None] - x[None, :]) ** 2).sum() / n**2
    closed = n * (math.sqrt(2 * math.pi) * pairs - 2 * math.sqrt(math.pi) / n * torch.exp(-x**2 / 4).sum()
                  + math.sqrt(2 * math.pi / 3))
    t, weights = epps_pulley_knots(4001, 12.0)
    got = epps_pulley(x[:, None], t.double(), weights.double())
    assert torch.allclose(got, closed.reshape(1), rtol=1e-5)


def test_epps_pulley_with_a_reduced_sum_equals_the_concatenated_batch():
    # A "second process" holding the same rows: the reduced sums double, and N doubles.
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    t, weights = epps_pulley_knots()
    halves = epps_pulley(x, t, weights, reduce_sum=lambda sums: 2 * sums, total_samples=12)
    assert torch.allclose(halves, epps_pulley(torch.cat([x, x]), t, weights), rtol=1e-6)


def test_random_directions_are_unit_and_determined_by_the_seed():
    a = random_directions(5, 7, torch.Generator().manual_seed(3))
    assert a.shape == (5, 7) and torch.allclose(a.norm(dim=0), torch.ones(7))
    assert torch.equal(a, random_directions(5, 7, torch.Generator().manual_seed(3)))
    assert not torch.allclose(a, random_directions(5, 7, torch.Generator().manual_seed(4)))


def test_sigreg_is_near_zero_for_a_standard_normal_sample_and_large_when_collapsed():
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(4096, 16, generator=generator)
    directions = random_directions(16, 64, generator)
    t, weights = epps_pulley_knots()
    gaussian = sigreg(z, directions, t, weights)
    assert gaussian < 2.0  # the statistic's mean under the null is about sqrt(2 pi) - sqrt(2 pi / 3) = 1.06
    # every row at 0: |1 - exp(-t^2/2)|^2 integrated against the window, 0.409 per sample
    collapsed = sigreg(torch.zeros(4096, 16), directions, t, weights)
    assert collapsed > 0.35 * 4096
    assert sigreg(0.1 * z, directions, t, weights) > 100 * gaussian  # right shape, wrong scale
    assert sigreg(z + 1.0, directions, t, weights) > 100 * gaussian  # off centre


def test_lejepa_prediction_targets_the_mean_of_the_global_views_with_gradient():
    # V = 3 views of N = 1 sample, D = 2: globals (1, 0) and (3, 2) -> centre (2, 1); local (5, 1).
    # squared errors: (1 + 1) + (1 + 1) + (9 + 0) = 13 over 3 * 1 * 2 entries.
    z = torch.tensor([[[1.0, 0.0]], [[3.0, 2.0]], [[5.0, 1.0]]], requires_grad=True)
    loss = lejepa_prediction(z, num_global=2)
    assert torch.allclose(loss, torch.tensor(13 / 6))
    loss.backward()
    assert z.grad[0].abs().sum() > 0 and z.grad[1].abs().sum() > 0  # no stop-gradient on the centre
    with pytest.raises(ValueError, match="num_global"):
        lejepa_prediction(z.detach(), num_global=4)


def test_lejepa_is_the_convex_combination_of_prediction_and_per_view_sigreg():
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(3, 10, 4, generator=generator)
    directions = random_directions(4, 8, generator)
    t, weights = epps_pulley_knots()
    terms = lejepa(z, 2, directions, t, weights, lambd=0.25)
    per_view = torch.stack([sigreg(view, directions, t, weights) for view in z]).mean()
    assert torch.allclose(terms.sigreg, per_view)
    assert torch.allclose(terms.total, 0.75 * terms.prediction + 0.25 * per_view)


# ---------------------------------------------------------------- VISReg terms, by hand


def test_visreg_center_and_scale_on_a_three_by_two_example():
    z = torch.tensor([[1.0, 2.0], [3.0, 2.0], [5.0, 8.0]])
    # means (3, 4): centre = (9 + 16) / 2
    assert torch.allclose(visreg_center(z), torch.tensor(12.5))
    # population stds: sqrt(8 / 3) (deviations -2, 0, 2) and sqrt(24 / 3) (deviations -2, -2, 4)
    expected = ((1 - math.sqrt(8 / 3)) ** 2 + (1 - math.sqrt(8)) ** 2) / 2
    assert torch.allclose(visreg_scale(z), torch.tensor(expected))
    unit = torch.tensor([[-1.0, 1.0], [1.0, -1.0]])  # mean 0, std 1 in both dims
    assert visreg_center(unit) == 0 and visreg_scale(unit) == 0


def test_visreg_shape_is_sliced_wasserstein_to_gaussian_quantiles():
    # z = (0, 1, 2) on the direction (1): standardised +-1 / (sqrt(2/3) + eps) and 0; quantiles at 1/4, 2/4, 3/4
    # are -+0.6744897501960817 and 0.
    q = 0.6744897501960817
    assert torch.allclose(gaussian_quantiles(3), torch.tensor([-q, 0.0, q]))
    eps = 1e-4
    value = 1 / (math.sqrt(2 / 3) + eps)
    expected = 2 * (value - q) ** 2 / 3
    got = visreg_shape(torch.tensor([[0.0], [1.0], [2.0]]), torch.ones(1, 1), eps=eps)
    assert torch.allclose(got, torch.tensor(expected), rtol=1e-6)


def test_visreg_shape_ignores_scale_and_shift_and_leaves_the_std_without_gradient():
    generator = torch.Generator().manual_seed(2)
    z = torch.rand(64, 3, generator=generator) ** 3  # skewed: far from Gaussian
    directions = random_directions(3, 16, generator)
    shape = visreg_shape(z, directions, eps=1e-8)
    assert torch.allclose(visreg_shape(5.0 * z - 2.0, directions, eps=1e-8), shape, rtol=1e-4)
    # stop-gradient on the std: the gradient equals that of the same expression with a constant std
    z = z.requires_grad_()
    visreg_shape(z, directions, eps=1e-8).backward()
    std = z.detach().std(dim=0, unbiased=False, keepdim=True) + 1e-8
    manual = z.detach().clone().requires_grad_()
    projections = (((manual - manual.mean(0, keepdim=True)) / std) @ directions).sort(dim=0).values
    ((projections - gaussian_quantiles(64)[:, None]) ** 2).mean().backward()
    assert torch.allclose(z.grad, manual.grad, atol=1e-6)


def test_visreg_combines_the_weighted_terms():
    generator = torch.Generator().manual_seed(3)
    z = torch.randn(3, 8, 4, generator=generator)
    directions = random_directions(4, 8, generator)
    terms = visreg(z, 2, directions, lambd=0.6, center_weight=2.0, scale_weight=0.5, shape_weight=3.0)
    regulariser = 2.0 * visreg_center(z) + 0.5 * visreg_scale(z) + 3.0 * visreg_shape(z, directions)
    assert torch.allclose(terms.total, 0.4 * lejepa_prediction(z, 2) + 0.6 * regulariser)


# ---------------------------------------------------------------- the objectives


@pytest.mark.parametrize("key", ["lejepa", "visreg"])
def test_objective_from_its_recipe_options_trains_every_parameter(key):
    with open(recipe_path(key), encoding="utf-8") as handle:
        options = yaml.safe_load(handle)["objective"]
    objective = _build(key, **{**options, **SMALL})
    views = objective.views()
    assert views.keys() == ["global0", "global1", "local0", "local1"]
    outputs = objective(_crops(8))
    terms = {"sigreg"} if key == "lejepa" else {"center", "scale", "shape"}
    assert set(outputs) == {"loss", "prediction", "embedding_std"} | terms
    assert all(torch.isfinite(value) for value in outputs.values())
    outputs["loss"].backward()
    for name, parameter in objective.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert not any(name.startswith(("target", "teacher")) for name, _ in objective.named_parameters())  # no EMA
    state = [name for name in objective.state_dict() if not name.startswith(("encoder.", "projector."))]
    assert state == ["steps_done"]  # the step that seeds the directions, nothing else


@pytest.mark.parametrize("key", ["lejepa", "visreg"])
def test_forward_is_the_loss_on_the_projections_with_step_seeded_directions(key):
    objective = _build(key, num_global_crops=3)
    batch = _crops(8, globals_=3)
    objective.after_step(4, 10)
    assert int(objective.steps_done) == 5
    objective.eval()  # BN on running statistics: the projections below are the forward's
    with torch.no_grad():
        z, num_global = objective.projections(batch)
        directions = random_directions(8, 32, torch.Generator().manual_seed(5))
        assert num_global == 3 and z.shape == (5, 8, 8)
        if key == "lejepa":
            t, weights = epps_pulley_knots(17, 3.0)
            want = lejepa(z, 3, directions, t, weights, 0.05).total
        else:
            want = visreg(z, 3, directions, 0.9).total
        assert torch.allclose(objective(batch)["loss"], want)
        objective.after_step(5, 10)
        assert not torch.allclose(objective(batch)["loss"], want)  # new step, new directions


def test_views_follow_the_number_of_global_and_local_crops():
    objective = _build("lejepa", num_global_crops=3, num_local_crops=1)
    assert objective.views().keys() == ["global0", "global1", "global2", "local0"]


@pytest.mark.parametrize("key", ["lejepa", "visreg"])
def test_state_survives_state_dict_save_and_load(key, tmp_path):
    objective = _build(key)
    for step in range(3):
        objective(_crops(8, step=step))["loss"].backward()
        objective.after_step(step, 10)
    torch.save(objective.state_dict(), tmp_path / "state.pt")
    restored = _build(key, seed=7)
    restored.load_state_dict(torch.load(tmp_path / "state.pt"))
    assert int(restored.steps_done) == 3
    objective.eval(), restored.eval()
    batch = _crops(8, step=5)
    assert torch.allclose(objective(batch)["loss"], restored(batch)["loss"])


@pytest.mark.parametrize("key,options,match", [
    ("lejepa", {"lambd": 1.5}, "lambd must be in"),
    ("lejepa", {"knots": 1}, "knots must be >= 2"),
    ("lejepa", {"t_max": 0}, "t_max must be > 0"),
    ("lejepa", {"num_slices": 0}, "num_slices must be >= 1"),
    ("lejepa", {"num_global_crops": 1}, "num_global_crops must be >= 2"),
    ("lejepa", {"lambd": "x"}, "lambd must be a number"),
    ("visreg", {"shape_weight": -1}, "shape_weight must be >= 0"),
    ("visreg", {"eps": 0}, "eps must be > 0"),
    ("visreg", {"augment": {"bogus": 1}}, "augment"),
    ("visreg", {"knots": 17}, "unknown option"),
])
def test_bad_options_are_clear_errors(key, options, match):
    with pytest.raises(ValueError, match=match):
        _build(key, **options)


# ---------------------------------------------------------------- two processes = one process


def _two_step_crops(step: int = 0) -> dict:
    return _crops(8, step=step)


def _build_lejepa():  # module level: the two-process helper pickles these
    return _build("lejepa")


def _build_visreg():
    return _build("visreg")


@pytest.mark.parametrize("build", [_build_lejepa, _build_visreg])
def test_two_processes_equal_one_process(build, tmp_path):
    """lejepa: the ECF's cos / sin sums and the prediction sum are all-reduced with autograd; visreg: the
    projections are gathered; two steps, so the step-seeded directions change in between, identically on both
    processes. Losses at rtol 1e-5 (the helper's), gradients at rtol 1e-5."""
    assert_two_processes_match_one(build, _two_step_crops, tmp_path, steps=2, rtol=1e-5)
