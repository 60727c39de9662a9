"""DCL, DCLW, MACL, ReSSL, DirectCLR and CO2: the losses against hand-worked values (unit vectors at known angles,
so every exponential is written out), their stop-gradients and invariants, the objectives built from their
recipes' options, state buffers through state_dict, option errors, and two processes against one."""
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from distributed_helpers import assert_two_processes_match_one

import trainer.objectives  # noqa: F401  (registration)
from trainer.config import TrainConfig, load_recipe, recipe_path
from trainer.losses import nt_xent
from trainer.losses.co2 import co2_consistency
from trainer.losses.dcl import dcl, dclw, von_mises_fisher_weights
from trainer.losses.macl import macl, model_aware_temperature
from trainer.losses.ressl import ressl
from trainer.objectives import ObjectiveSpec, get_objective

SIZE = 16
KEYS = ["dcl", "dclw", "macl", "directclr", "ressl", "co2"]
SMALL = {"dcl": {"projection_dim": 16, "projection_hidden_dim": 32},
         "dclw": {"projection_dim": 16, "projection_hidden_dim": 32},
         "macl": {"projection_dim": 16, "projection_hidden_dim": 32},
         "directclr": {"sub_dim": 40},
         "ressl": {"projection_dim": 16, "projection_hidden_dim": 32, "queue_size": 32},
         "co2": {"projection_dim": 16, "projection_hidden_dim": 32, "queue_size": 32, "bn_splits": 2}}
E = math.e


def _unit(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def _build(key: str, seed: int = 0, **options):
    torch.manual_seed(seed)
    spec = ObjectiveSpec(backbone="cnn-small", image_size=SIZE, options={**SMALL[key], **options})
    return get_objective(key).build(spec)


def _views(n: int = 8, seed: int = 1, step: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed + 100 * step)
    return {f"view{i}": torch.randn(n, 3, SIZE, SIZE, generator=generator) for i in range(2)}


# ---- DCL / DCLW by hand ----

# View 1 at 0 and 90 degrees, view 2 at 60 and 150 (scaled: normalisation is part of the loss). Cosines: both
# positives 1/2; z1_0.z1_1 = z2_0.z2_1 = 0; z1_0.z2_1 = cos 150 = -c, z1_1.z2_0 = cos 30 = c, c = sqrt(3)/2.
Z1 = torch.tensor([_unit(0), _unit(90)]) * torch.tensor([[2.0], [0.5]])
Z2 = torch.tensor([_unit(60), _unit(150)]) * 3.0
C = math.sqrt(3) / 2


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_dcl_by_hand(tau):
    # Anchors z1_0 and z2_1 have negatives {0, -c}; z1_1 and z2_0 have {0, +c}; the positive (1/2) is not among them.
    a = C / tau
    expected = -0.5 / tau + 0.5 * (math.log(1 + math.exp(-a)) + math.log(1 + math.exp(a)))
    assert dcl(Z1, Z2, tau).item() == pytest.approx(expected, rel=1e-5)
    # NT-Xent keeps the positive in the denominator: log(e^{1/(2 tau)} + 1 + e^{-+a}) instead.
    with_positive = -0.5 / tau + 0.5 * sum(math.log(math.exp(0.5 / tau) + 1 + math.exp(s)) for s in (-a, a))
    assert nt_xent(Z1, Z2, tau).item() == pytest.approx(with_positive, rel=1e-5)


def test_dcl_of_orthonormal_identical_views():
    z = torch.eye(3)  # N = 3 views equal to their positives, orthogonal to every negative (2N - 2 = 4 of cos 0)
    assert dcl(z, z.clone(), 0.2).item() == pytest.approx(-1 / 0.2 + math.log(4), rel=1e-6)


def test_von_mises_fisher_weights_by_hand():
    # Positive cosines 1 and 0, sigma 1/2: w = 2 - 2 softmax(2, 0) = (2 / (e^2 + 1), 2 e^2 / (e^2 + 1)).
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    z2 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    weights = von_mises_fisher_weights(z1, z2, 0.5)
    assert weights.tolist() == pytest.approx([2 / (E**2 + 1), 2 * E**2 / (E**2 + 1)], rel=1e-6)
    assert weights.mean().item() == pytest.approx(1.0) and not weights.requires_grad
    # Equal alignments give weight 1 everywhere: DCLW is DCL.
    assert von_mises_fisher_weights(Z1, Z2).tolist() == pytest.approx([1.0, 1.0])
    assert dclw(Z1, Z2, 0.5).item() == pytest.approx(dcl(Z1, Z2, 0.5).item(), abs=1e-6)


def test_dclw_by_hand():
    # z1 = (1,0), (0,1); z2 = (1,0), (1,0); tau 1, sigma 1/2 (weights w0, w1 above). Per anchor (negatives after +):
    #   z1_0: -w0 * 1 + log(e^0 [z1_1] + e^1 [z2_1]);  z1_1: -w1 * 0 + log(e^0 + e^0);
    #   z2_0: -w0 * 1 + log(e^1 [z2_1] + e^0 [z1_1]);  z2_1: -w1 * 0 + log(e^1 [z2_0] + e^1 [z1_0]).
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    w0 = 2 / (E**2 + 1)
    expected = (-2 * w0 + 2 * math.log(1 + E) + math.log(2) + math.log(2 * E)) / 4
    assert dclw(z1, z2, 1.0, 0.5).item() == pytest.approx(expected, rel=1e-6)
    assert dcl(z1, z2, 1.0).item() == pytest.approx((-2 + 2 * math.log(1 + E) + math.log(2) + math.log(2 * E)) / 4)


def test_dcl_needs_negatives_and_matching_weights():
    with pytest.raises(ValueError, match="at least 2 pairs"):
        dcl(Z1[:1], Z2[:1])
    with pytest.raises(ValueError, match="positive_weights"):
        dcl(Z1, Z2, 0.1, torch.ones(3))


# ---- MACL by hand ----

def test_macl_by_hand():
    # Same pairs as DCL: A = 1/2, so tau = 1 * (1 + 0.5 * (0.5 - 0)) = 1.25. Each anchor: s+ = 0.5 / tau and
    # negatives {0, -+c} / tau; P = e^{s+} / (e^{s+} + sum e^{s-}), V = 1 / (1 - P), loss = mean(-V log P).
    tau = 1.25
    assert model_aware_temperature(0.5, 1.0, 0.5, 0.0) == pytest.approx(tau)
    terms = []
    for sign in (-1, 1):
        positive, negatives = math.exp(0.5 / tau), 1 + math.exp(sign * C / tau)
        p = positive / (positive + negatives)
        terms.append(-math.log(p) / (1 - p))
    assert macl(Z1, Z2, 1.0, 0.5, 0.0).item() == pytest.approx(sum(terms) / 2, rel=1e-5)
    # A_0 = A gives tau = tau_0.
    assert model_aware_temperature(0.5, 0.2, 0.5, 0.5) == pytest.approx(0.2)


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_macl_gradient_is_the_decoupled_gradient_at_its_temperature(alpha):
    # -V grad log P+ = grad s+ - sum_j softmax_over_negatives_j grad s_j: DCL's gradient at the same (detached)
    # temperature, so the reweighting exactly removes the positive's coupling.
    generator = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 4, generator=generator), torch.randn(5, 4, generator=generator)
    a1, a2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    macl(a1, a2, 0.2, alpha).backward()
    alignment = (F.normalize(z1, dim=1) * F.normalize(z2, dim=1)).sum(dim=1).mean()
    b1, b2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    dcl(b1, b2, float(model_aware_temperature(alignment, 0.2, alpha))).backward()
    assert torch.allclose(a1.grad, b1.grad, atol=1e-5) and torch.allclose(a2.grad, b2.grad, atol=1e-5)


def test_macl_keeps_its_gradient_when_positives_dominate():
    # Positives at cosine 1, negatives at 0, tau 0.05: margin m = 20 - log 6, 1 - P+ ~ 1e-8 is below float32's
    # resolution around 1, yet V (-log P+) -> 1 and the gradient is still DCL's.
    z = torch.eye(4) + 0.01 * torch.arange(16.0).view(4, 4)
    a1, a2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    loss = macl(a1, a2, 0.05, 0.0)
    assert loss.item() == pytest.approx(1.0, rel=1e-3)
    loss.backward()
    b1, b2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    dcl(b1, b2, 0.05).backward()
    assert torch.allclose(a1.grad, b1.grad, atol=1e-4) and torch.allclose(a2.grad, b2.grad, atol=1e-4)
    extreme = torch.eye(4, requires_grad=True)  # tau 0.01: margin ~98, past the cap on V
    loss = macl(extreme, torch.eye(4), 0.01, 0.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(extreme.grad).all()


def test_macl_rejects_a_temperature_that_can_reach_zero():
    with pytest.raises(ValueError, match="tau <= 0"):
        macl(Z1, Z2, 0.1, 1.0, 0.0)  # A = -1 would give tau = 0


# ---- ReSSL by hand ----

def test_ressl_by_hand():
    # Queue (1,0), (0,1); student and teacher at (1,0). Teacher logits (2, 0) at tau_t 1/2: p_t = (e^2, 1) / (e^2 + 1).
    # Student logits (1, 0) at tau_s 1: log p_s = (1, 0) - log(1 + e). H(p_t, p_s) = log(1 + e) - p_t[0].
    queue = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    student = torch.tensor([[2.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[1.0, 0.0]], requires_grad=True)
    loss = ressl(student, teacher, queue, 1.0, 0.5)
    assert loss.item() == pytest.approx(math.log(1 + E) - E**2 / (E**2 + 1), rel=1e-6)
    loss.backward()
    assert teacher.grad is None and student.grad is not None  # the teacher's relation is a fixed target


def test_ressl_equals_the_teacher_entropy_when_the_relations_agree():
    generator = torch.Generator().manual_seed(0)
    x, queue = torch.randn(4, 3, generator=generator), torch.randn(6, 3, generator=generator)
    target = torch.softmax(F.normalize(x, dim=1) @ F.normalize(queue, dim=1).t() / 0.1, dim=1)
    entropy = -(target * target.log()).sum(dim=1).mean()
    assert ressl(x, x.clone(), queue, 0.1, 0.1).item() == pytest.approx(entropy.item(), rel=1e-5)  # KL = 0
    assert ressl(x * -1, x, queue, 0.1, 0.1).item() > entropy.item()


# ---- CO2 by hand ----

def test_co2_consistency_by_hand():
    # Query (1,0), key (0,1), one negative (1,0), tau_con 1. P = softmax(q.k, q.n) = softmax(0, 1);
    # Q = softmax(k.q, k.n) = softmax(0, 0) = (1/2, 1/2). Regulariser = (KL(P||Q) + KL(Q||P)) / 2.
    p = [1 / (1 + E), E / (1 + E)]
    kl_pq = sum(pi * math.log(pi / 0.5) for pi in p)
    kl_qp = sum(0.5 * math.log(0.5 / pi) for pi in p)
    query, key, negatives = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[2.0, 0.0]])
    assert co2_consistency(query, key, negatives, 1.0).item() == pytest.approx((kl_pq + kl_qp) / 2, rel=1e-6)
    assert co2_consistency(key, query, negatives, 1.0).item() == pytest.approx((kl_pq + kl_qp) / 2, rel=1e-6)


def test_co2_consistency_is_zero_for_agreeing_views_and_matches_lightlys_form():
    generator = torch.Generator().manual_seed(0)
    q, k, n = (torch.randn(5, 4, generator=generator), torch.randn(5, 4, generator=generator),
               torch.randn(7, 4, generator=generator))
    assert co2_consistency(q, 2 * q, n).item() == pytest.approx(0.0, abs=1e-6)
    # lightly's CO2Regularizer (transcribed): log-softmax of [q.k, q.n] and [k.q, k.n] / t, KLDivLoss(batchmean,
    # log_target) both ways, times 1/2.
    q1, k1, n1 = F.normalize(q, dim=1), F.normalize(k, dim=1), F.normalize(n, dim=1)
    positive = (q1 * k1).sum(1, keepdim=True)
    log_p = F.log_softmax(torch.cat([positive, q1 @ n1.t()], 1) / 0.05, 1)
    log_q = F.log_softmax(torch.cat([positive, k1 @ n1.t()], 1) / 0.05, 1)
    kl = functools.partial(F.kl_div, reduction="batchmean", log_target=True)
    assert co2_consistency(q, k, n, 0.05).item() == pytest.approx(0.5 * (kl(log_p, log_q) + kl(log_q, log_p)).item(),
                                                                 rel=1e-5)


# ---- objectives ----

def _recipe_options(key: str) -> dict:
    return load_recipe(recipe_path(key), TrainConfig(objective=key)).objective_options


@pytest.mark.parametrize("key", KEYS)
def test_objective_builds_from_its_recipe_and_trains(key):
    objective = _build(key, **{**_recipe_options(key), **SMALL[key]}).train()
    outputs = objective(_views())
    assert outputs["loss"].dim() == 0 and torch.isfinite(outputs["loss"])
    assert all(torch.isfinite(value) for value in outputs.values())
    assert "embedding_std" in outputs or "accuracy" in outputs
    outputs["loss"].backward()
    grads = [p.grad for p in objective.encoder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    objective.after_step(0, 10)


def test_dclw_differs_from_dcl_only_in_its_weighting():
    dcl_objective, dclw_objective = _build("dcl"), _build("dclw")
    assert type(dclw_objective).__mro__[1] is type(dcl_objective)
    batch = _views()
    assert not torch.isclose(dcl_objective(batch)["loss"], dclw_objective(batch)["loss"])
    z = dcl_objective.embed(batch)
    assert dclw_objective.loss_from_projections(z["z1"], z["z2"], batch)["loss"].item() == pytest.approx(
        dclw(z["z1"], z["z2"], 0.1, 0.5).item(), rel=1e-6)


def test_macl_logs_its_model_aware_temperature():
    outputs = _build("macl", temperature=0.2, alpha=0.5)(_views())
    assert outputs["temperature"].item() == pytest.approx(0.2 * (1 + 0.5 * outputs["alignment"].item()), rel=1e-6)


def test_directclr_trains_the_leading_dimensions_without_a_projector():
    objective = _build("directclr")
    assert {name.split(".")[0] for name, _ in objective.named_parameters()} == {"encoder"}
    assert objective.sub_dim == 40
    assert _build("directclr", sub_dim=None).sub_dim == round(256 * 360 / 2048)  # cnn-small is 256-d: 45
    batch = _views()
    outputs = objective(batch)
    r1, r2 = objective.encoder.encode_image(batch["view0"]), objective.encoder.encode_image(batch["view1"])
    # Symmetric cross-view InfoNCE (the authors' code) on r[:, :40], tau 0.1.
    logits = F.normalize(r1[:, :40], dim=1) @ F.normalize(r2[:, :40], dim=1).t() / 0.1
    targets = torch.arange(8)
    expected = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))
    assert outputs["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="sub_dim=300 exceeds the 256-d"):
        _build("directclr", sub_dim=300)


def test_ressl_views_teacher_queue_and_momentum():
    objective = _build("ressl", momentum=0.9).train()
    recipe = objective.views()
    assert recipe.config.jitter_prob > 0 and recipe.config.grayscale_prob > 0  # strong student view0
    weak = recipe.second_config  # the teacher's view1: crop and flip only
    assert (weak.jitter_prob, weak.grayscale_prob, weak.blur_prob, weak.solarize_prob) == (0, 0, 0, 0)
    assert weak.crop_scale == recipe.config.crop_scale and weak.flip > 0

    batch = _views()
    objective(batch)["loss"].backward()
    assert all(p.grad is None for p in objective.teacher_encoder.parameters())
    assert all(p.grad is None for p in objective.teacher_projector.parameters())
    with torch.no_grad():
        teacher = F.normalize(objective.teacher_projector(objective.teacher_encoder.encode_image(batch["view1"])), dim=1)
    online = [p.detach().clone() for p in objective.encoder.parameters()]
    target = [p.detach().clone() for p in objective.teacher_encoder.parameters()]
    objective.after_step(0, 10)
    assert torch.allclose(objective.queue[:8], teacher, atol=1e-6) and int(objective.queue_ptr) == 8
    for after, before, theta in zip(objective.teacher_encoder.parameters(), target, online):
        assert torch.allclose(after, 0.9 * before + 0.1 * theta, atol=1e-6)  # constant m (paper)

    cosine = _build("ressl", momentum=0.9, final_momentum=1.0)
    cosine.after_step(9, 10)  # the last step: m = 1, the teacher stays put
    assert all(torch.equal(a, b) for a, b in zip(cosine.teacher_encoder.parameters(),
                                                 _build("ressl").teacher_encoder.parameters()))


@pytest.mark.parametrize("key", ["ressl", "co2"])
def test_queue_round_trips_through_state_dict(key):
    objective = _build(key).train()
    objective(_views())["loss"].backward()
    objective.after_step(0, 10)
    restored = _build(key, seed=3)
    restored.load_state_dict(objective.state_dict())
    assert torch.equal(restored.queue, objective.queue) and int(restored.queue_ptr) == 8


def test_co2_is_moco2_plus_the_weighted_regulariser():
    batch = _views()
    torch.manual_seed(0)  # as _build: the same weights and queue
    moco2 = get_objective("moco2").build(ObjectiveSpec(backbone="cnn-small", image_size=SIZE, options=SMALL["co2"]))
    co2 = _build("co2", consistency_weight=2.0)
    assert torch.equal(co2.queue, moco2.queue)  # same construction
    torch.manual_seed(7)  # the key batch's shuffle
    expected = moco2(batch)
    torch.manual_seed(7)
    outputs = co2(batch)
    assert outputs["contrastive_loss"].item() == pytest.approx(expected["loss"].item(), rel=1e-6)
    assert outputs["accuracy"].item() == expected["accuracy"].item()
    assert outputs["loss"].item() == pytest.approx(
        (outputs["contrastive_loss"] + 2.0 * outputs["consistency_loss"]).item(), rel=1e-6)
    assert outputs["consistency_loss"].item() > 0


@pytest.mark.parametrize("key,options,message", [
    ("dcl", {"temperature": 0}, "temperature must be > 0"),
    ("dclw", {"sigma": -1}, "sigma must be > 0"),
    ("macl", {"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
    ("macl", {"alpha": 0.8, "alignment_threshold": 0.5}, "temperature stays > 0"),
    ("directclr", {"sub_dim": 0}, "sub_dim must be a positive integer"),
    ("ressl", {"final_momentum": 0.5, "momentum": 0.99}, "momentum <= final_momentum"),
    ("ressl", {"teacher_temperature": "zero"}, "teacher_temperature must be a number"),
    ("co2", {"consistency_temperature": 0}, "consistency_temperature must be > 0"),
    ("co2", {"consistency_weight": -1}, "consistency_weight must be >= 0"),
])
def test_option_errors_name_the_option(key, options, message):
    with pytest.raises(ValueError, match=message):
        _build(key, **options)


# ---- two processes = one process on the concatenated batch ----

class _AllObjectives(torch.nn.Module):
    """The five objectives side by side, their losses summed: one two-process run checks them all (each spawn
    costs seconds of start-up), every gradient still compared under its own parameter name."""

    def __init__(self):
        super().__init__()
        self.objectives = torch.nn.ModuleDict({key: _build(key) for key in ("dclw", "macl", "directclr", "ressl", "co2")})

    def forward(self, batch: dict) -> dict:
        return {"loss": sum(objective(batch)["loss"] for objective in self.objectives.values())}

    def after_step(self, step: int, total_steps: int) -> None:
        for objective in self.objectives.values():
            objective.after_step(step, total_steps)


def _global_batch(step: int = 0) -> dict:
    return _views(8, seed=11, step=step)


def test_two_processes_equal_one_process(tmp_path):
    """The summed loss (rtol 1e-5) and every gradient of 2 processes x 4 images equal 1 process x 8: global
    negatives (DCLW, MACL, DirectCLR), DCLW's batch softmax, MACL's alignment, ReSSL's and CO2's queues (two
    steps: the second sees the enqueued keys). dcl is dclw with weights 1. Gradients reach ~5 at tau 0.1, so
    the absolute tolerance is 1e-4 (float32 summation-order noise at that scale is ~2e-5)."""
    assert_two_processes_match_one(_AllObjectives, _global_batch, tmp_path, steps=2, atol=1e-4)
