"""SupCon and alignment/uniformity: losses against loops and closed forms, the objectives (and SimCLR's
``loss`` option) on one and two processes, and short learning runs against the random-init kNN floor."""
import math

import pytest
import torch
import torch.nn.functional as F

import trainer.objectives.align_uniform  # noqa: F401  (registration)
import trainer.objectives.supcon  # noqa: F401  (registration)
from distributed_helpers import assert_two_processes_match_one
from trainer.losses import alignment, nt_xent, supcon, uniformity
from trainer.objectives import ObjectiveSpec, get_objective

SIZE = 16
BATCH = 8  # per process in the two-process tests


def _supcon_loop(features, labels, tau, base_tau):
    """L_out written out: anchors are all N*V views, A(i) all others, P(i) those of the same label."""
    n, v, _ = features.shape
    z = F.normalize(features, dim=2)
    views = [(s, a) for a in range(v) for s in range(n)]
    losses = []
    for i, (si, ai) in enumerate(views):
        others = [(s, a) for j, (s, a) in enumerate(views) if j != i]
        sim = lambda s, a: float(z[si, ai] @ z[s, a]) / tau  # noqa: E731
        denominator = sum(math.exp(sim(s, a)) for s, a in others)
        positives = [(s, a) for s, a in others if labels[s] == labels[si]]
        if positives:
            losses.append(-(tau / base_tau) * sum(math.log(math.exp(sim(s, a)) / denominator) for s, a in positives) / len(positives))
    return sum(losses) / len(losses)


def test_supcon_matches_loop_with_an_anchor_without_positives():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(5, 1, 4, generator=generator)  # one view: sample 4's class (2) has no other member
    labels = [0, 1, 0, 1, 2]
    loss = supcon(features, torch.tensor(labels), 0.5, 0.7)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(_supcon_loop(features, labels, 0.5, 0.7), rel=1e-5)


def test_supcon_matches_loop_with_three_views():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(4, 3, 5, generator=generator)
    labels = [2, 0, 2, 1]
    assert supcon(features, torch.tensor(labels), 0.3, 0.3).item() == pytest.approx(
        _supcon_loop(features, labels, 0.3, 0.3), rel=1e-5)


def test_supcon_without_labels_is_nt_xent_times_temperature_ratio():
    generator = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(6, 8, generator=generator), torch.randn(6, 8, generator=generator)
    features = torch.stack([z1, z2], dim=1)
    assert supcon(features, None, 0.5, 0.5).item() == pytest.approx(nt_xent(z1, z2, 0.5).item(), rel=1e-6)
    assert supcon(features, None, 0.1, 0.07).item() == pytest.approx(nt_xent(z1, z2, 0.1).item() * 0.1 / 0.07, rel=1e-6)
    # Unknown labels (-1) are classes of their own, so an all-unknown batch is the SimCLR loss too.
    assert supcon(features, torch.full((6,), -1), 0.5, 0.5).item() == pytest.approx(nt_xent(z1, z2, 0.5).item(), rel=1e-6)


def test_supcon_closed_form_two_classes():
    # Two samples of class 0 at e1 and one of class 1 at e2, one view each, tau 1: anchor e1 has A = {e1, e2},
    # P = {e1}: -log(e / (e + 1)); the other e1 likewise; e2 has no positive and is left out.
    features = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]], [[0.0, 1.0]]])
    expected = -math.log(math.e / (math.e + 1))
    assert supcon(features, torch.tensor([0, 0, 1]), 1.0, 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_supcon_no_anchor_with_a_positive_is_zero_without_nan():
    features = torch.randn(3, 1, 4, requires_grad=True)
    loss = supcon(features, torch.tensor([0, 1, 2]))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(features.grad).all()
    features = torch.randn(4, 2, 4, requires_grad=True)
    supcon(features, torch.tensor([0, 0, 1, 2]), 0.05).backward()
    assert torch.isfinite(features.grad).all()


def test_alignment_closed_forms():
    e = torch.eye(3)
    assert alignment(e, e.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert alignment(e, e.roll(1, dims=0)).item() == pytest.approx(2.0, rel=1e-6)  # orthogonal pairs: |d|^2 = 2
    assert alignment(e, -e, alpha=1).item() == pytest.approx(2.0, rel=1e-6)  # antipodal: |d| = 2
    assert alignment(3 * e, e.roll(1, dims=0), alpha=3).item() == pytest.approx(2 ** 1.5, rel=1e-6)  # normalised inside
    x = e.clone().requires_grad_()
    alignment(x, e.clone(), alpha=1).backward()  # coinciding pairs: no NaN from the norm's gradient
    assert torch.isfinite(x.grad).all()


def test_uniformity_closed_forms_and_loop():
    t = 2.0
    assert uniformity(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), t).item() == pytest.approx(-4 * t, rel=1e-6)
    assert uniformity(torch.eye(4), t).item() == pytest.approx(-2 * t, rel=1e-6)  # all pairs |d|^2 = 2
    assert uniformity(torch.ones(3, 2), t).item() == pytest.approx(0.0, abs=1e-6)  # collapsed
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, generator=generator)
    z = F.normalize(x, dim=1)
    pairs = [math.exp(-t * float((z[i] - z[j]).pow(2).sum())) for i in range(5) for j in range(i + 1, 5)]
    assert uniformity(x, t).item() == pytest.approx(math.log(sum(pairs) / len(pairs)), rel=1e-5)
    with pytest.raises(ValueError, match="N >= 2"):
        uniformity(torch.randn(1, 3))


def _build(key: str, **options):
    torch.manual_seed(0)
    defaults = {"projection_dim": 16, "projection_hidden_dim": 32}
    return get_objective(key).build(ObjectiveSpec(backbone="cnn-small", image_size=SIZE, options={**defaults, **options}))


def _batch() -> dict:
    generator = torch.Generator().manual_seed(1)
    n = 2 * BATCH
    return {"view0": torch.randn(n, 3, SIZE, SIZE, generator=generator),
            "view1": torch.randn(n, 3, SIZE, SIZE, generator=generator),
            # Classes spread over both halves, plus unlabelled samples (-1), so positives cross processes.
            "label": torch.tensor([0, 1, 2, 3, 0, 1, -1, 2, 3, 0, 1, 2, -1, 3, 0, 1]),
            "id": torch.arange(n)}


def _build_supcon():
    return _build("supcon")


def _build_simclr_debiased():
    return _build("simclr", loss="debiased", tau_plus=0.1)


def _build_align_uniform():
    return _build("align_uniform")


@pytest.mark.parametrize("build", [_build_supcon, _build_simclr_debiased, _build_align_uniform])
def test_two_processes_equal_one_process_on_the_global_batch(build, tmp_path):
    assert_two_processes_match_one(build, _batch, tmp_path)


def test_supcon_objective_uses_labels_and_logs_unlabelled_share():
    objective = _build("supcon")
    batch = _batch()
    outputs = objective(batch)
    z1, z2 = (objective.projector(objective.encoder.encode_image(batch[view])) for view in ("view0", "view1"))
    expected = supcon(torch.stack([z1, z2], dim=1), batch["label"], 0.1, 0.07)
    assert outputs["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert outputs["unlabelled"].item() == pytest.approx(2 / 16)
    unsupervised = _build("supcon", use_labels=False)(batch)["loss"]
    assert unsupervised.item() != pytest.approx(outputs["loss"].item(), rel=1e-3)


def test_align_uniform_objective_loss_is_weighted_sum_of_metrics():
    outputs = _build("align_uniform", uniform_weight=0.5)(_batch())
    assert outputs["loss"].item() == pytest.approx(outputs["align"].item() + 0.5 * outputs["uniform"].item(), rel=1e-5)
    assert 0.0 <= outputs["align"].item() <= 4.0 and -4.0 <= outputs["uniform"].item() <= 0.0


@pytest.mark.parametrize("loss", ["nce", "flatnce", "debiased", "hcl"])
def test_simclr_loss_option_runs_each_kind(loss):
    outputs = _build("simclr", loss=loss)(_batch())
    outputs["loss"].backward()
    assert torch.isfinite(outputs["loss"])


def test_simclr_default_loss_is_nt_xent_and_unknown_loss_is_an_error():
    batch = _batch()
    objective = _build("simclr")  # default: one encoder pass per view
    z1, z2 = (objective.projector(objective.encoder.encode_image(batch[view])) for view in ("view0", "view1"))
    assert torch.equal(objective(batch)["loss"], nt_xent(z1, z2, 0.5))
    joint = _build("simclr", encode_views_jointly=True)  # one pass over both views: BN over 2N images
    z1, z2 = joint.projector(joint.encoder.encode_image(torch.cat([batch["view0"], batch["view1"]]))).chunk(2)
    assert torch.equal(joint(batch)["loss"], nt_xent(z1, z2, 0.5))
    assert not torch.equal(joint(batch)["loss"], objective(batch)["loss"])
    with pytest.raises(ValueError, match="simclr: loss 'triplet' is not one of infonce, nce"):
        _build("simclr", loss="triplet")
