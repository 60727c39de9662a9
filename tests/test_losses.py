"""Losses against hand-worked values: direct loops over anchors and closed forms."""
import math

import pytest
import torch
import torch.nn.functional as F

from trainer.losses import clip_loss, info_nce, nt_xent


def _nt_xent_loop(z1, z2, tau):
    z = F.normalize(torch.cat([z1, z2]), dim=1).tolist()
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        sim = lambda a, b: sum(x * y for x, y in zip(z[a], z[b])) / tau  # noqa: E731
        denominator = sum(math.exp(sim(i, k)) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(sim(i, j)) / denominator)
    return total / (2 * n)


def test_nt_xent_matches_direct_loop():
    generator = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(4, 3, generator=generator), torch.randn(4, 3, generator=generator)
    assert nt_xent(z1, z2, 0.5).item() == pytest.approx(_nt_xent_loop(z1, z2, 0.5), rel=1e-5)


def test_nt_xent_closed_form_two_orthogonal_pairs():
    # z1 = z2 = (e1, e2). Anchor e1 of view 0 has its positive e1 (cos 1) and negatives e2, e2 (cos 0):
    # anchor e1 (view 0): positive e1 (cos 1), negatives e2 (view 0), e2 (view 1), both cos 0.
    z = torch.eye(2)
    tau = 0.5
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 2 * math.exp(0.0)))
    assert nt_xent(z, z.clone(), tau).item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_batch_of_one_is_zero_and_finite():
    z = torch.randn(1, 8)
    loss = nt_xent(z, torch.randn(1, 8), 0.1)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(0.0, abs=1e-6)


def test_nt_xent_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        nt_xent(torch.randn(2, 3), torch.randn(3, 3))


def test_info_nce_with_negative_keys_matches_loop():
    generator = torch.Generator().manual_seed(1)
    q, k, negatives = (torch.randn(3, 4, generator=generator), torch.randn(3, 4, generator=generator),
                       torch.randn(5, 4, generator=generator))
    qn, kn, nn_ = F.normalize(q, dim=1), F.normalize(k, dim=1), F.normalize(negatives, dim=1)
    tau = 0.07
    expected = 0.0
    for i in range(3):
        positive = math.exp(float(qn[i] @ kn[i]) / tau)
        negative = sum(math.exp(float(qn[i] @ nn_[j]) / tau) for j in range(5))
        expected += -math.log(positive / (positive + negative))
    assert info_nce(q, k, negatives, tau).item() == pytest.approx(expected / 3, rel=1e-4)


def test_info_nce_in_batch_negatives_closed_form():
    # Orthonormal queries equal to their keys: logits = I / tau, so each row's loss is log(1 + (N-1) e^{-1/tau}).
    q = torch.eye(3)
    tau = 0.2
    expected = math.log(1 + 2 * math.exp(-1 / tau))
    assert info_nce(q, q.clone(), None, tau).item() == pytest.approx(expected, rel=1e-6)


def test_clip_loss_closed_form_and_symmetry():
    image, text = torch.eye(2), torch.eye(2)
    scale = 2.0
    expected = math.log(1 + math.exp(-scale))  # each row: -log(e^s / (e^s + e^0))
    assert clip_loss(image, text, scale).item() == pytest.approx(expected, rel=1e-6)
    a, b = torch.randn(5, 7), torch.randn(5, 7)
    assert clip_loss(a, b, 3.0).item() == pytest.approx(clip_loss(b, a, 3.0).item(), rel=1e-6)


def test_clip_loss_matches_loop():
    generator = torch.Generator().manual_seed(2)
    a, b = torch.randn(3, 4, generator=generator), torch.randn(3, 4, generator=generator)
    an, bn = F.normalize(a, dim=1), F.normalize(b, dim=1)
    s = 5.0
    logits = [[s * float(an[i] @ bn[j]) for j in range(3)] for i in range(3)]
    image_to_text = sum(-logits[i][i] + math.log(sum(math.exp(x) for x in logits[i])) for i in range(3)) / 3
    text_to_image = sum(-logits[j][j] + math.log(sum(math.exp(logits[i][j]) for i in range(3))) for j in range(3)) / 3
    assert clip_loss(a, b, s).item() == pytest.approx((image_to_text + text_to_image) / 2, rel=1e-5)
