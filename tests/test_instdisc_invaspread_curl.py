"""InstDisc, InvaSpread and CURL: losses against hand-worked values, the memory bank's update, Z and resume,
CURL's momentum encoder and bilinear scores, 2-process equivalence, and short learning runs."""
import math

import pytest
import torch
import torch.nn.functional as F

import trainer.objectives.curl  # noqa: F401  (registration)
import trainer.objectives.instdisc  # noqa: F401
import trainer.objectives.invaspread  # noqa: F401
from distributed_helpers import assert_two_processes_match_one
from trainer.losses.invaspread import invariance_spreading_loss
from trainer.losses.memory_bank import estimate_normaliser, momentum_update, proximal_penalty
from trainer.objectives import ObjectiveSpec, get_objective

SIZE = 16
BANK = 24


def _build(key: str, seed: int = 0, **options):
    torch.manual_seed(seed)
    return get_objective(key).build(ObjectiveSpec(backbone="cnn-small", image_size=SIZE, options=options,
                                                  num_train_samples=BANK if key == "instdisc" else None))


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- InvaSpread loss

def _invaspread_loop(f, f_hat, tau):
    f, f_hat = F.normalize(f, dim=1).tolist(), F.normalize(f_hat, dim=1).tolist()
    n = len(f)
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    total = 0.0
    for i in range(n):  # invariance: P(i | x̂_i), softmax over the originals k
        total += math.log(math.exp(dot(f[i], f_hat[i]) / tau) / sum(math.exp(dot(f[k], f_hat[i]) / tau) for k in range(n)))
    for j in range(n):  # spreading: 1 - P(i | x_j), i != j
        denominator = sum(math.exp(dot(f[k], f[j]) / tau) for k in range(n))
        for i in range(n):
            if i != j:
                total += math.log(1.0 - math.exp(dot(f[i], f[j]) / tau) / denominator)
    return -total / n


def test_invaspread_loss_matches_direct_loop():
    generator = torch.Generator().manual_seed(0)
    f, f_hat = torch.randn(5, 3, generator=generator), torch.randn(5, 3, generator=generator)
    assert invariance_spreading_loss(f, f_hat, 0.1).item() == pytest.approx(_invaspread_loop(f, f_hat, 0.1), rel=1e-5)
    # The two inputs play different roles (the spreading term uses originals only): swapping them changes the loss.
    assert invariance_spreading_loss(f_hat, f, 0.1).item() != pytest.approx(invariance_spreading_loss(f, f_hat, 0.1).item(), rel=1e-3)


def test_invaspread_loss_closed_form_two_orthogonal_instances():
    # f = f̂ = (e1, e2): P(i|x̂_i) = e^{1/t} / (e^{1/t} + 1) and P(i|x_j) = 1 / (e^{1/t} + 1) for j != i, so
    # L = -(1/2) [2 log(e^{1/t}/(e^{1/t}+1)) + 2 log(1 - 1/(e^{1/t}+1))] = -2 log(e^{1/t} / (e^{1/t} + 1)).
    tau = 0.5
    expected = -2.0 * math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 1.0))
    assert invariance_spreading_loss(torch.eye(2), torch.eye(2), tau).item() == pytest.approx(expected, rel=1e-6)


def test_invaspread_loss_is_finite_at_small_temperature_and_trains_both_inputs():
    f, f_hat = torch.randn(6, 4, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    loss = invariance_spreading_loss(f, f_hat, 0.01)
    loss.backward()
    assert torch.isfinite(loss) and f.grad.abs().sum() > 0 and f_hat.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="one shape"):
        invariance_spreading_loss(torch.randn(2, 3), torch.randn(3, 3))


# ---------------------------------------------------------------- memory bank helpers

def test_bank_momentum_update_and_proximal_penalty_hand_computed():
    entries, features = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    s = 1 / math.sqrt(2)
    assert torch.allclose(momentum_update(entries, features, 0.5), torch.tensor([[s, s], [0.0, 1.0]]))
    # eta = 0.75: normalize(0.75 (1, 0) + 0.25 (0, 1)) = (3, 1) / sqrt(10)
    assert torch.allclose(momentum_update(entries[:1], features[:1], 0.75), torch.tensor([[3.0, 1.0]]) / math.sqrt(10))
    # ||(1,0) - (0,1)||^2 = 2 and ||(0,1) - (0,1)||^2 = 0 -> mean 1; masking the first row leaves 0 (mean over 2).
    assert proximal_penalty(entries, features).item() == pytest.approx(1.0)
    assert proximal_penalty(entries, features, torch.tensor([False, True])).item() == pytest.approx(0.0)


def test_estimate_normaliser_hand_computed():
    tau = 0.07
    scores = torch.tensor([[0.0, tau * math.log(2.0)], [tau * math.log(3.0), tau * math.log(2.0)]])  # e^{s/t}: 1, 2, 3, 2
    assert estimate_normaliser(scores, 100, tau).item() == pytest.approx(100 * 2.0, rel=1e-5)


# ---------------------------------------------------------------- InstDisc objective

def _instdisc_batch(ids=(0, 3, 5, 7)):
    return {"view0": _images(len(ids), 1), "id": torch.tensor(ids)}


# (6, 128): the bank is scored whole and the noise columns picked; (2, 8): noise rows gathered ([N, m, D]).
@pytest.mark.parametrize("m,dim", [(6, 128), (2, 8)])
def test_instdisc_nce_loss_and_normaliser_match_hand_computation(m, dim):
    objective = _build("instdisc", proximal_weight=0.0, num_noise=m, projection_dim=dim)
    batch = _instdisc_batch()
    torch.manual_seed(5)
    out = objective(batch)
    torch.manual_seed(5)  # the same noise draw the objective made (the encoder draws no random numbers)
    noise_ids = torch.randint(BANK, (4, m))
    with torch.no_grad():
        f = F.normalize(objective.encoder.encode_image(batch["view0"]), dim=1)
    tau, n = 0.07, BANK
    noise_scores = torch.einsum("nd,nmd->nm", f, objective.bank[noise_ids])
    z = n * sum(math.exp(s / tau) for s in noise_scores.flatten().tolist()) / noise_scores.numel()  # paper eq. 7
    assert objective.normaliser.item() == pytest.approx(z, rel=1e-4)
    total = 0.0
    for i, sample in enumerate(batch["id"].tolist()):
        h = lambda s: (math.exp(s / tau) / z) / (math.exp(s / tau) / z + m / n)  # noqa: E731
        total += math.log(h(float(f[i] @ objective.bank[sample])))
        total += sum(math.log(1.0 - h(s)) for s in noise_scores[i].tolist())
    assert out["contrast"].item() == pytest.approx(-total / 4, rel=1e-4)
    # Z stays fixed after the first batch.
    objective(_instdisc_batch((1, 2, 3, 4)))
    assert objective.normaliser.item() == pytest.approx(z, rel=1e-4)


def test_instdisc_bank_update_proximal_term_and_resume():
    objective = _build("instdisc", num_noise=5, bank_momentum=0.5, proximal_weight=2.0)
    batch = _instdisc_batch((2, 9))
    before = objective.bank.clone()
    out = objective(batch)
    assert out["proximal"].item() == 0.0  # nothing seen yet: no v^(t-1) to stay close to
    out["loss"].backward()
    f = F.normalize(objective.encoder.encode_image(batch["view0"]), dim=1).detach()
    objective.after_step(0, 1)
    expected = before.clone()
    expected[[2, 9]] = F.normalize(0.5 * before[[2, 9]] + 0.5 * f, dim=1)
    assert torch.allclose(objective.bank, expected, atol=1e-6)
    assert objective.seen.tolist() == [1 if i in (2, 9) else 0 for i in range(BANK)]
    # Second visit: the proximal term is ||f - v^(t-1)||^2 against the row just written.
    out = objective(batch)
    assert out["proximal"].item() == pytest.approx(((f - expected[[2, 9]]) ** 2).sum(dim=1).mean().item(), rel=1e-4)
    objective.after_step(1, 2)

    resumed = _build("instdisc", seed=1, num_noise=5)  # different random bank before loading
    assert not torch.equal(resumed.bank, objective.bank)
    resumed.load_state_dict(objective.state_dict())
    for name in ("bank", "seen", "normaliser", "steps_done"):
        assert torch.equal(getattr(resumed, name), getattr(objective, name)), name
    z = objective.normaliser.item()
    resumed(batch)
    assert resumed.normaliser.item() == z  # restored Z is kept, not re-estimated


def test_instdisc_normaliser_warmup_estimates_per_batch_then_fixes_z():
    objective = _build("instdisc", num_noise=5, normaliser_warmup_steps=1)
    objective(_instdisc_batch())
    assert objective.normaliser.item() < 0  # step 0 < warm-up: estimated for this batch only
    objective.after_step(0, 3)
    assert int(objective.steps_done) == 1
    objective(_instdisc_batch((1, 2, 3, 4)))
    z = objective.normaliser.item()
    assert z > 0
    objective.after_step(1, 3)
    objective(_instdisc_batch())
    assert objective.normaliser.item() == z


def test_instdisc_rejects_ids_outside_the_bank_with_the_slots_hint():
    objective = _build("instdisc", num_noise=4)
    with pytest.raises(ValueError, match="outside the memory bank.*dense slot"):
        objective(_instdisc_batch((0, 123456789)))
    with pytest.raises(ValueError, match="number of training samples"):
        get_objective("instdisc").build(ObjectiveSpec(backbone="cnn-small", image_size=SIZE))


def test_instdisc_caps_noise_samples_at_bank_size():
    assert _build("instdisc").num_noise == BANK - 1


# ---------------------------------------------------------------- CURL objective

def test_curl_loss_is_cross_entropy_of_bilinear_scores():
    objective = _build("curl", projection_dim=6)
    batch = {"view0": _images(4, 1), "view1": _images(4, 2)}
    out = objective(batch)
    with torch.no_grad():
        q = objective.head(objective.encoder.encode_image(batch["view0"]))
        k = objective.key_head(objective.key_encoder.encode_image(batch["view1"]))
    w = objective.W.detach()
    total = 0.0
    for i in range(4):  # -log softmax_i of row i of q W k^T
        row = [float(q[i] @ w @ k[j]) for j in range(4)]
        total += -(row[i] - math.log(sum(math.exp(r) for r in row)))
    assert out["loss"].item() == pytest.approx(total / 4, rel=1e-4)
    assert torch.all(q.abs() <= 1.0)  # tanh code
    out["loss"].backward()
    assert objective.W.grad is not None and objective.W.grad.abs().sum() > 0
    assert all(p.grad is None for p in objective.key_encoder.parameters())
    names = {n for group in objective.parameter_groups(0.1) for p in group["params"] for n, q_ in objective.named_parameters() if q_ is p}
    assert not any(n.startswith("key_") for n in names) and "W" in names


def test_curl_momentum_update_hand_computed():
    objective = _build("curl", key_momentum=0.9, projection_dim=6)
    query = dict(objective.encoder.named_parameters())
    key = dict(objective.key_encoder.named_parameters())
    name = next(iter(query))
    with torch.no_grad():
        query[name].add_(1.0)  # query = key + 1
    before = key[name].clone()
    objective.after_step(0, 10)
    assert torch.allclose(key[name], 0.9 * before + 0.1 * (before + 1.0), atol=1e-6)


def test_curl_views_are_two_shifted_crops_of_the_padded_image():
    from PIL import Image

    views = get_objective("curl").build(ObjectiveSpec(backbone="cnn-small", image_size=SIZE)).views()
    pixels = torch.arange(SIZE * SIZE * 3, dtype=torch.uint8).view(SIZE, SIZE, 3).numpy()
    out = views(Image.fromarray(pixels), None)
    assert out["view0"].shape == out["view1"].shape == (3, SIZE, SIZE)
    torch.manual_seed(0)
    shifts = [views(Image.fromarray(pixels), None)["view0"] for _ in range(8)]
    assert any(not torch.equal(shifts[0], s) for s in shifts[1:])  # random crops, not a fixed one


# ---------------------------------------------------------------- every objective x every loss kind

@pytest.mark.parametrize("key,kind", [(key, kind) for key in ("instdisc", "invaspread", "curl")
                                      for kind in ("infonce", "nce", "flatnce", "debiased", "hcl")]
                         + [("instdisc", "nce"), ("invaspread", "invaspread")])
def test_every_loss_kind_gives_finite_loss_and_gradients(key, kind):
    objective = _build(key, loss=kind, **({"num_noise": 8} if key == "instdisc" else {}))
    batch = {"view0": _images(4, 1), "view1": _images(4, 2), "id": torch.tensor([0, 1, 2, 3])}
    out = objective(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in objective.encoder.parameters())


def test_invaspread_infonce_option_is_info_nce_with_augmented_queries():
    from trainer.losses import info_nce

    objective = _build("invaspread", loss="infonce")
    batch = {"view0": _images(4, 1), "view1": _images(4, 2)}
    out = objective(batch)
    with torch.no_grad():
        f, f_hat = objective.encoder.encode_image(torch.cat([batch["view0"], batch["view1"]])).chunk(2)
    assert out["loss"].item() == pytest.approx(info_nce(f_hat, f, None, 0.1).item(), rel=1e-5)


def test_unknown_loss_kind_fails_at_build():
    for key in ("instdisc", "invaspread", "curl"):
        with pytest.raises(ValueError, match=f"{key}: loss 'triplet' is not one of "):
            _build(key, loss="triplet")


# ---------------------------------------------------------------- two processes

def _build_invaspread():
    return _build("invaspread", projection_dim=16)


def _build_curl():
    return _build("curl", projection_dim=8)


def _pairs_batch() -> dict:
    return {"view0": _images(8, 1), "view1": _images(8, 2)}


@pytest.mark.parametrize("build", [_build_invaspread, _build_curl])
def test_two_processes_equal_one_process_on_the_global_batch(build, tmp_path):
    assert_two_processes_match_one(build, _pairs_batch, tmp_path)


# ---------------------------------------------------------------- learning
