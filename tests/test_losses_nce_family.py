"""The NCE loss family (nce, flatnce, debiased, hcl) against direct Python loops and closed forms."""
import math

import pytest
import torch
import torch.nn.functional as F

from trainer.losses import (
    CONTRASTIVE_LOSSES,
    contrastive_loss,
    contrastive_loss_from_similarities,
    debiased_nce,
    flat_nce,
    hard_negative_nce,
    info_nce,
    loss_options_for,
    nce,
)


def _data(seed: int, n: int = 4, d: int = 5, k: int = 6):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=generator), torch.randn(n, d, generator=generator),
            torch.randn(k, d, generator=generator), torch.randn(n, k, d, generator=generator))


def _cosines(q, k, negatives):
    """Per-query python lists: (positive cosine, [negative cosines]) in info_nce's convention."""
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    rows = []
    for i in range(len(q)):
        if negatives is None:
            negs = [float(qn[i] @ kn[j]) for j in range(len(q)) if j != i]
        elif negatives.dim() == 2:
            negs = [float(qn[i] @ F.normalize(negatives[j], dim=0)) for j in range(len(negatives))]
        else:
            negs = [float(qn[i] @ F.normalize(negatives[i, j], dim=0)) for j in range(negatives.shape[1])]
        rows.append((float(qn[i] @ kn[i]), negs))
    return rows


def _nce_loop(rows, tau, pn=None, z=None):
    m = len(rows[0][1])
    pn = 1.0 / (m + 1) if pn is None else pn
    if z is None:
        scores = [math.exp(s / tau) for pos, negs in rows for s in [pos, *negs]]
        z = sum(scores) / len(scores) / pn
    h = lambda s: (math.exp(s / tau) / z) / (math.exp(s / tau) / z + m * pn)  # noqa: E731
    return sum(-math.log(h(pos)) - sum(math.log(1 - h(s)) for s in negs) for pos, negs in rows) / len(rows)


def _flat_loop(rows, tau):
    return sum(math.log(sum(math.exp((s - pos) / tau) for s in negs)) for pos, negs in rows) / len(rows)


def _debiased_loop(rows, tau, tau_plus, beta=0.0):
    total = 0.0
    for pos, negs in rows:
        k = len(negs)
        weights = [math.exp(beta * s / tau) for s in negs]
        mean_weight = sum(weights) / k
        reweighted = sum(w / mean_weight * math.exp(s / tau) for w, s in zip(weights, negs))
        ng = max((reweighted - tau_plus * k * math.exp(pos / tau)) / (1 - tau_plus), k * math.exp(-1 / tau))
        total += -math.log(math.exp(pos / tau) / (math.exp(pos / tau) + ng))
    return total / len(rows)


@pytest.mark.parametrize("which", ["in_batch", "shared", "per_query"])
def test_each_kind_matches_direct_loop(which):
    q, k, shared, per_query = _data(0)
    negatives = {"in_batch": None, "shared": shared, "per_query": per_query}[which]
    rows = _cosines(q, k, negatives)
    tau = 0.5
    assert nce(q, k, negatives, tau).item() == pytest.approx(_nce_loop(rows, tau), rel=1e-5)
    assert nce(q, k, negatives, tau, noise_probability=0.01, normaliser=3.0).item() == pytest.approx(
        _nce_loop(rows, tau, 0.01, 3.0), rel=1e-5)
    assert flat_nce(q, k, negatives, tau).item() == pytest.approx(_flat_loop(rows, tau), rel=1e-5, abs=1e-6)
    assert debiased_nce(q, k, negatives, tau, tau_plus=0.1).item() == pytest.approx(
        _debiased_loop(rows, tau, 0.1), rel=1e-5)
    assert hard_negative_nce(q, k, negatives, tau, beta=1.0, tau_plus=0.1).item() == pytest.approx(
        _debiased_loop(rows, tau, 0.1, beta=1.0), rel=1e-5)


def test_infonce_through_the_dispatcher_is_info_nce():
    q, k, shared, per_query = _data(1)
    for negatives in (None, shared):
        assert torch.equal(contrastive_loss("infonce", q, k, negatives, 0.2), info_nce(q, k, negatives, 0.2))
    # Per-query negatives (which info_nce does not take) agree with info_nce on the same keys shared by all.
    tiled = shared.unsqueeze(0).expand(q.shape[0], -1, -1)
    assert contrastive_loss("infonce", q, k, tiled, 0.2).item() == pytest.approx(info_nce(q, k, shared, 0.2).item(), rel=1e-6)


def test_debiased_clamp_closed_form():
    # Query = positive = e1, negatives = e1 too (all false negatives), tau+ = 0.5: the estimator
    # (K e^{1/t} - 0.5 K e^{1/t}) / 0.5 = K e^{1/t} is above the clamp. With the negatives at -e1 it is
    # (K e^{-1/t} - 0.5 K e^{1/t}) / 0.5 < 0, and the clamp sets it to K e^{-1/t}.
    tau, k = 0.5, 3
    q = torch.tensor([[1.0, 0.0]])
    same = q.expand(k, 2)
    expected_unclamped = math.log(1 + k)  # -log(e^{1/t} / (e^{1/t} + K e^{1/t}))
    assert debiased_nce(q, q, same, tau, tau_plus=0.5).item() == pytest.approx(expected_unclamped, rel=1e-5)
    expected_clamped = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + k * math.exp(-1 / tau)))
    assert debiased_nce(q, q, -same, tau, tau_plus=0.5).item() == pytest.approx(expected_clamped, rel=1e-5)


def test_debiased_without_prior_is_infonce_and_hcl_without_concentration_is_debiased():
    q, k, shared, _ = _data(2)
    tau = 1.0  # the clamp K e^{-1} is far below sum_j e^{s_j} here, so tau+ = 0 leaves plain InfoNCE
    assert debiased_nce(q, k, shared, tau, tau_plus=0.0).item() == pytest.approx(info_nce(q, k, shared, tau).item(), rel=1e-5)
    for tau_plus in (0.0, 0.2):
        assert hard_negative_nce(q, k, shared, 0.3, beta=0.0, tau_plus=tau_plus).item() == pytest.approx(
            debiased_nce(q, k, shared, 0.3, tau_plus=tau_plus).item(), rel=1e-6)


def test_hcl_weights_hard_negatives_more():
    # One easy (orthogonal) and one hard (close to the query) negative: raising beta moves weight to the
    # hard one, so the loss grows with beta.
    q = torch.tensor([[1.0, 0.0, 0.0]])
    negatives = torch.tensor([[0.0, 1.0, 0.0], [0.9, 0.1, 0.0]])
    values = [hard_negative_nce(q, q, negatives, 0.5, beta=b, tau_plus=0.0).item() for b in (0.0, 1.0, 4.0)]
    assert values[0] < values[1] < values[2]


def test_nce_closed_form():
    # One query, positive cos 1, one negative cos 0, tau 1, Z = 1, Pn = 1/2, m = 1: h(s) = e^s / (e^s + 1/2).
    q = torch.tensor([[1.0, 0.0]])
    negative = torch.tensor([[0.0, 1.0]])
    h_pos, h_neg = math.e / (math.e + 0.5), 1.0 / (1.0 + 0.5)
    expected = -math.log(h_pos) - math.log(1 - h_neg)
    assert nce(q, q, negative, 1.0, normaliser=1.0).item() == pytest.approx(expected, rel=1e-6)


def test_flat_nce_gradient_is_infonce_gradient_over_sigmoid():
    # InfoNCE = softplus(v), FlatNCE's gradient is grad v, so per query grad_flat = grad_infonce / sigmoid(v):
    # the same direction, scaled up by a positive per-sample factor (no vanishing gradient for easy queries).
    generator = torch.Generator().manual_seed(3)
    positive = torch.rand(3, generator=generator) * 2 - 1
    negatives = torch.rand(3, 5, generator=generator) * 2 - 1
    tau = 0.2
    grads = {}
    for kind in ("infonce", "flatnce"):
        pos, neg = positive.clone().requires_grad_(), negatives.clone().requires_grad_()
        contrastive_loss_from_similarities(kind, pos, neg, tau).backward()
        grads[kind] = torch.cat([pos.grad.unsqueeze(1), neg.grad], dim=1)
    v = torch.logsumexp((negatives - positive.unsqueeze(1)) / tau, dim=1)
    assert torch.allclose(grads["flatnce"], grads["infonce"] / torch.sigmoid(v).unsqueeze(1), rtol=1e-4, atol=1e-7)
    # ... and equals the gradient of the paper's exp(v - sg(v)) written out directly.
    pos, neg = positive.clone().requires_grad_(), negatives.clone().requires_grad_()
    v_direct = torch.logsumexp((neg - pos.unsqueeze(1)) / tau, dim=1)
    torch.exp(v_direct - v_direct.detach()).mean().backward()
    assert torch.allclose(grads["flatnce"], torch.cat([pos.grad.unsqueeze(1), neg.grad], dim=1), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("kind", CONTRASTIVE_LOSSES)
def test_batch_of_one_in_batch_is_zero_with_zero_gradients(kind):
    q = torch.randn(1, 4, requires_grad=True)
    k = torch.randn(1, 4, requires_grad=True)
    options = loss_options_for(kind, {"tau_plus": 0.1, "beta": 1.0})
    loss = contrastive_loss(kind, q, k, None, 0.1, **options)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(q.grad == 0) and torch.all(k.grad == 0)


@pytest.mark.parametrize("kind", CONTRASTIVE_LOSSES)
def test_tiny_temperature_is_finite(kind):
    # e^{1/0.005} overflows float32: everything must be computed in log space.
    q, k, shared, _ = _data(4)
    q.requires_grad_()
    loss = contrastive_loss(kind, q, k, shared, 0.005, **loss_options_for(kind, {"tau_plus": 0.1, "beta": 1.0}))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(q.grad).all()


def test_unknown_kind_and_options_are_errors():
    q, k, _, _ = _data(5)
    with pytest.raises(ValueError, match="infonce, nce, flatnce, debiased, hcl"):
        contrastive_loss("triplet", q, k)
    with pytest.raises(ValueError, match="tau_plus"):
        contrastive_loss("flatnce", q, k, None, 0.1, tau_plus=0.1)
    with pytest.raises(ValueError, match=r"\[K, D\] or \[N, K, D\]"):
        contrastive_loss("nce", q, k, torch.randn(2, 3, 5))
    assert loss_options_for("hcl", {"tau_plus": 0.2, "beta": 2.0, "temperature": 0.1}) == {"tau_plus": 0.2, "beta": 2.0}


def test_two_view_similarities_give_nt_xent_and_the_right_negatives():
    from trainer.losses import nt_xent, two_view_similarities

    generator = torch.Generator().manual_seed(6)
    z1, z2 = torch.randn(3, 4, generator=generator), torch.randn(3, 4, generator=generator)
    positive, negatives = two_view_similarities(z1, z2)
    assert negatives.shape == (6, 4)
    assert contrastive_loss_from_similarities("infonce", positive, negatives, 0.5).item() == pytest.approx(
        nt_xent(z1, z2, 0.5).item(), rel=1e-6)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    # Anchor 1 (sample 1, view 0): positive is row 4; negatives are rows 0, 2, 3, 5 in order.
    assert positive[1].item() == pytest.approx(float(z[1] @ z[4]), rel=1e-6)
    assert torch.allclose(negatives[1], z[[0, 2, 3, 5]] @ z[1], atol=1e-6)
