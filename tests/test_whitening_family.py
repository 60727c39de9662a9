"""MMCR, W-MSE, FroSSL and EMP-SSL: the nuclear-norm, whitening, log-Frobenius and coding-rate losses against
hand-worked values and their defining properties, the objectives' views, state and option errors, and two
processes against one process on the concatenated batch (every loss is a global-batch quantity)."""
import math

import pytest
import torch
from distributed_helpers import assert_two_processes_match_one

from trainer.data.views import ManyViews
from trainer.losses.coding_rate import (
    emp_ssl,
    frobenius_entropy,
    frossl,
    patch_invariance,
    total_coding_rate,
    view_invariance,
)
from trainer.losses.mmcr import mmcr, nuclear_norm
from trainer.losses.wmse import sub_batches, whiten, wmse
from trainer.objectives import ObjectiveSpec, get_objective

SIZE = 16
VIEWS = 3
SMALL = {"mmcr": {"num_views": VIEWS, "projection_dim": 8, "projection_hidden_dim": 16},
         "wmse": {"num_views": VIEWS, "projection_dim": 4, "projection_hidden_dim": 16, "w_size": 8},
         "frossl": {"num_views": VIEWS, "projection_dim": 8, "projection_hidden_dim": 16},
         "emp_ssl": {"num_patches": VIEWS, "projection_dim": 8, "projection_hidden_dim": 16}}
KEYS = list(SMALL)


def _build(key: str, init_seed: int = 0, **options):
    torch.manual_seed(init_seed)
    return get_objective(key).build(ObjectiveSpec(backbone="cnn-small", image_size=SIZE,
                                                  options={**SMALL[key], **options}))


def _views(n: int = 8, step: int = 0) -> dict:
    generator = torch.Generator().manual_seed(1 + 100 * step)
    return {f"view{i}": torch.randn(n, 3, SIZE, SIZE, generator=generator) for i in range(VIEWS)}


# ---- MMCR ----

def test_nuclear_norm_of_a_2x2_matrix_by_hand():
    # A = [[3, 0], [4, 5]]: A^T A = [[25, 20], [20, 25]] has eigenvalues 45 and 5, so the singular values are
    # 3 sqrt(5) and sqrt(5): ||A||_* = 4 sqrt(5) (= sqrt(||A||_F^2 + 2 |det A|) = sqrt(50 + 30)).
    a = torch.tensor([[3.0, 0.0], [4.0, 5.0]])
    assert nuclear_norm(a).item() == pytest.approx(4 * math.sqrt(5), rel=1e-6)
    assert nuclear_norm(torch.stack([a, torch.eye(2), -2 * torch.eye(2)])).tolist() == pytest.approx(
        [4 * math.sqrt(5), 2.0, 4.0], rel=1e-6)


def test_mmcr_by_hand():
    # Image 0: views (1, 0) and (0, 3) -> normalised (1, 0), (0, 1), centroid (1/2, 1/2).
    # Image 1: views (2, 0) and (5, 0) -> both (1, 0), centroid (1, 0).
    # C = [[1/2, 1/2], [1, 0]]: ||C||_F^2 = 3/2, |det C| = 1/2, so ||C||_* = sqrt(3/2 + 1) = sqrt(5/2).
    # Per-image view matrices: [[1, 0], [0, 1]] (||.||_* = 2) and [[1, 0], [1, 0]] (rank 1, sqrt(2)).
    z = torch.tensor([[[1.0, 0.0], [0.0, 3.0]], [[2.0, 0.0], [5.0, 0.0]]])
    assert mmcr(z).item() == pytest.approx(-math.sqrt(2.5), rel=1e-6)
    assert mmcr(z, lambd=0.5).item() == pytest.approx(-math.sqrt(2.5) + 0.5 * (2 + math.sqrt(2)) / 2, rel=1e-6)
    assert mmcr(7 * z).item() == pytest.approx(mmcr(z).item(), rel=1e-6)  # scale-free (normalised views)


def test_mmcr_optimum_and_collapse():
    # Every image's views coincide and the centroids are orthonormal: ||C||_* = N, the minimum loss for N <= D.
    basis = torch.eye(3)[:, None, :].expand(3, 4, 3) * torch.tensor([1.0, 2.0, 3.0, 4.0])[None, :, None]
    assert mmcr(basis).item() == pytest.approx(-3.0, rel=1e-6)
    # Collapse: one direction for every view of every image, C has rank 1 and ||C||_* = sqrt(N).
    assert mmcr(torch.ones(4, 2, 3)).item() == pytest.approx(-2.0, rel=1e-6)
    # Views that disagree shorten the centroids and raise the loss.
    noisy = basis + 0.5 * torch.randn(3, 4, 3, generator=torch.Generator().manual_seed(0))
    assert mmcr(noisy).item() > -3.0


def test_mmcr_gradient_is_finite_and_bad_shapes_fail():
    z = torch.randn(6, 4, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
    mmcr(z, lambd=0.1).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="views"):
        mmcr(torch.randn(4, 5))


# ---- W-MSE ----

X = torch.tensor([[2.0, 1.0], [-1.0, 1.0], [-1.0, -2.0]])  # mean 0; X^T X = [[6, 3], [3, 6]]


def test_cholesky_whitening_of_three_samples_by_hand():
    # Sigma = X^T X / (3 - 1) = [[3, 3/2], [3/2, 3]] = L L^T with L = [[sqrt 3, 0], [sqrt(3)/2, 3/2]],
    # L^-1 = [[1/sqrt 3, 0], [-1/3, 2/3]]; the rows L^-1 x are (2/sqrt 3, 0), (-1/sqrt 3, 1), (-1/sqrt 3, -1).
    r = 1 / math.sqrt(3)
    expected = torch.tensor([[2 * r, 0.0], [-r, 1.0], [-r, -1.0]])
    assert torch.allclose(whiten(X), expected, atol=1e-6)
    # The mean is removed and a positive scale is undone: an affine copy whitens to the same rows.
    assert torch.allclose(whiten(3 * X + torch.tensor([5.0, -3.0])), expected, atol=1e-6)
    # Shrinkage eps = 1 would whiten with the identity: only centring is left (eps = 0.5 is in between).
    shrunk = whiten(X, eps=0.5)
    assert not torch.allclose(shrunk, expected, atol=1e-3) and torch.isfinite(shrunk).all()


def test_whitened_batches_have_identity_covariance_and_singular_ones_fail_clearly():
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(0)) @ torch.randn(5, 5) + 3
    w = whiten(x)
    assert torch.allclose(torch.cov(w.t()), torch.eye(5), atol=1e-4)
    with pytest.raises(ValueError, match="positive definite"):
        whiten(torch.randn(3, 5))  # 3 samples in 5 dimensions
    assert torch.isfinite(whiten(torch.randn(3, 5), eps=0.1)).all()


def test_wmse_by_hand():
    # View 1 is X with its second coordinate negated; it whitens (L'^-1 = [[1/sqrt 3, 0], [1/3, 2/3]]) to view 0's
    # whitened rows with the second coordinate negated: row 0 agrees (cos 1, loss 0), rows 1 and 2 have
    # cos = (1/3 - 1) / (4/3) = -1/2, loss 2 - 2 (-1/2) = 3. Mean over rows: (0 + 3 + 3) / 3 = 2.
    z = torch.stack([X, X * torch.tensor([1.0, -1.0])], dim=1)
    identity = torch.arange(3)
    assert wmse(z, [identity], w_size=3).item() == pytest.approx(2.0, rel=1e-5)
    # The row order inside a sub-batch does not matter; iterations average.
    assert wmse(z, [torch.tensor([2, 0, 1]), identity], w_size=3).item() == pytest.approx(2.0, rel=1e-5)
    # An affine copy of a view whitens to the same rows: loss 0.
    assert wmse(torch.stack([X, 2 * X + 1], dim=1), [identity], w_size=3).item() == pytest.approx(0.0, abs=1e-5)


def test_wmse_whitens_each_sub_batch_and_averages_view_pairs():
    # Rows 0-2: the pair above (per-row losses 0, 3, 3); rows 3-5: an affine copy (0, 0, 0). Sub-batches of 3
    # in the identity order: mean 6 / 6 = 1. Whitening all 6 rows together gives something else.
    z = torch.cat([torch.stack([X, X * torch.tensor([1.0, -1.0])], dim=1), torch.stack([X, 2 * X + 1], dim=1)])
    assert wmse(z, [torch.arange(6)], w_size=3).item() == pytest.approx(1.0, rel=1e-5)
    assert wmse(z, [torch.tensor([3, 4, 5, 0, 1, 2])], w_size=3).item() == pytest.approx(1.0, rel=1e-5)
    assert wmse(z, [torch.arange(6)], w_size=6).item() != pytest.approx(1.0, rel=1e-3)
    # Three views: the pairs (0, 1), (0, 2), (1, 2) are averaged: losses 2, 0, 2 on the first sub-batch.
    three = torch.stack([X, X * torch.tensor([1.0, -1.0]), 5 * X], dim=1)
    assert wmse(three, [torch.arange(3)], w_size=3).item() == pytest.approx(4.0 / 3, rel=1e-5)


def test_sub_batches_split_the_permutation_evenly():
    assert [len(part) for part in sub_batches(torch.arange(256), 128)] == [128, 128]
    assert [len(part) for part in sub_batches(torch.arange(10), 4)] == [5, 5]  # the remainder is spread
    assert [len(part) for part in sub_batches(torch.arange(3), 128)] == [3]  # a small batch is one sub-batch
    assert torch.equal(torch.cat(sub_batches(torch.tensor([4, 1, 3, 0, 2]), 2)), torch.tensor([4, 1, 3, 0, 2]))


# ---- FroSSL ----

def test_frobenius_entropy_by_hand():
    # View 0: columns (3, 0, 0) and (0, 4, 0) normalise to e1, e2: Z^T Z = I_2, C = I / 2, ||C||_F^2 = 1/2.
    # View 1: columns (1, 1, 1) and (2, 2, 2) both normalise to (1, 1, 1) / sqrt 3: Z^T Z = [[1, 1], [1, 1]],
    # C = Z^T Z / 2, ||C||_F^2 = 4 / 4 = 1 (rank one: collapse).
    z = torch.stack([torch.tensor([[3.0, 0.0], [0.0, 4.0], [0.0, 0.0]]),
                     torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]])], dim=1)
    assert frobenius_entropy(z).tolist() == pytest.approx([-math.log(2), 0.0], abs=1e-6)


def test_frobenius_entropy_equals_the_eigenvalue_formula_on_both_sides():
    # log sum_i lambda_i^2 of the eigenvalues of Z^T Z / tr(Z^T Z); N > D and N < D take the two Gram matrices.
    generator = torch.Generator().manual_seed(0)
    for n, d in ((7, 3), (3, 7)):
        z = torch.randn(n, 2, d, generator=generator, dtype=torch.float64)
        for v in range(2):
            columns = z[:, v] / z[:, v].norm(dim=0)
            eigenvalues = torch.linalg.eigvalsh(columns.t() @ columns)
            eigenvalues = eigenvalues / eigenvalues.sum()
            assert frobenius_entropy(z)[v].item() == pytest.approx(math.log(eigenvalues.pow(2).sum().item()), rel=1e-5)


def test_view_invariance_and_frossl_by_hand():
    # N = 2, D = 2. View 0 normalises to I; view 1 (columns (1, 1) and (2, 2)) to every entry 1 / sqrt 2.
    # Z_v - mean = +-(Z_0 - Z_1) / 2, so the sum over both views is ||Z_0 - Z_1||_F^2 / 2
    # = (2 (1 - 1/sqrt 2)^2 + 2 (1/sqrt 2)^2) / 2 = 2 - sqrt 2; divided by N = 2: 1 - 1/sqrt 2.
    z = torch.stack([torch.eye(2), torch.tensor([[1.0, 2.0], [1.0, 2.0]])], dim=1)
    invariance = 1 - 1 / math.sqrt(2)
    assert view_invariance(z).item() == pytest.approx(invariance, rel=1e-6)
    # Entropies: view 0 C = I / 2 (log 1/2), view 1 rank one (log 1 = 0).
    assert frossl(z).item() == pytest.approx(-math.log(2) + invariance, rel=1e-6)
    assert frossl(z, invariance_weight=3.0).item() == pytest.approx(-math.log(2) + 3 * invariance, rel=1e-6)
    # The same per-dimension normalised embeddings in every view: no invariance cost; scales per dimension cancel.
    same = torch.stack([torch.eye(2), torch.eye(2) * torch.tensor([5.0, 0.5])], dim=1)
    assert view_invariance(same).item() == pytest.approx(0.0, abs=1e-7)


# ---- EMP-SSL ----

def test_total_coding_rate_by_hand():
    # N = 2, D = 2, eps^2 = 0.2: the factor D / (N eps^2) = 5.
    # Rows (0.6, 0.8), (1, 0): Z^T Z = [[1.36, 0.48], [0.48, 0.64]], I + 5 Z^T Z = [[7.8, 2.4], [2.4, 4.2]],
    # det = 32.76 - 5.76 = 27, R = log(27) / 2.
    rows = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    assert total_coding_rate(rows).item() == pytest.approx(0.5 * math.log(27), rel=1e-6)
    # Orthonormal rows: I + 5 I, R = log 6; identical rows: diag(11, 1), R = log(11) / 2; zero rows: 0.
    sets = torch.stack([torch.eye(2), torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.zeros(2, 2)])
    assert total_coding_rate(sets).tolist() == pytest.approx([math.log(6), 0.5 * math.log(11), 0.0], rel=1e-6)
    # N < D uses I_N + c Z Z^T: rows e1, e2 in 3-d, c = 3 / (2 * 0.2) = 7.5: det = 8.5^2, R = log 8.5.
    assert total_coding_rate(torch.eye(3)[:2]).item() == pytest.approx(math.log(8.5), rel=1e-6)
    assert total_coding_rate(torch.eye(3)[:2], eps_squared=0.5).item() == pytest.approx(math.log(4), rel=1e-6)


def test_patch_invariance_and_emp_ssl_by_hand():
    # Image 0's patches (1, 0), (0, 1) and image 1's (0, 1), (1, 0): each patch has cosine 1/sqrt 2 to its image's
    # mean (1/2, 1/2). Patch index 0 holds the rows e1, e2 and index 1 e2, e1: R = log 6 for both.
    z = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])
    assert patch_invariance(z).item() == pytest.approx(1 / math.sqrt(2), rel=1e-6)
    assert emp_ssl(z).item() == pytest.approx(-(math.log(6) + 200 / math.sqrt(2)), rel=1e-6)
    assert emp_ssl(z, invariance_weight=0.0).item() == pytest.approx(-math.log(6), rel=1e-6)
    # Identical patches: perfect invariance.
    assert patch_invariance(torch.ones(3, 4, 2)).item() == pytest.approx(1.0, rel=1e-6)


# ---- objectives ----

@pytest.mark.parametrize("key", KEYS)
def test_objective_forward_backward(key):
    objective = _build(key).train()
    outputs = objective(_views())
    assert outputs["loss"].dim() == 0 and torch.isfinite(outputs["loss"])
    assert outputs["embedding_std"] > 0.05
    outputs["loss"].backward()
    grads = [p.grad for p in objective.encoder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in objective.projector.parameters())
    assert all(torch.is_tensor(v) and v.numel() == 1 for v in outputs.values())


@pytest.mark.parametrize("key", KEYS)
def test_views_are_k_views_of_one_recipe(key):
    from PIL import Image

    recipe = _build(key).views()
    assert isinstance(recipe, ManyViews) and recipe.num_views == VIEWS
    out = recipe(Image.new("RGB", (32, 32), (120, 30, 200)), None)
    assert sorted(out) == [f"view{i}" for i in range(VIEWS)]
    assert all(v.shape == (3, SIZE, SIZE) for v in out.values())


def test_emp_ssl_patches_are_fixed_quarter_area_crops():
    crop = _build("emp_ssl").views().transform.transforms[0]
    assert tuple(crop.scale) == (0.25, 0.25)


def test_mmcr_loss_equals_the_pure_loss_on_the_projections():
    objective = _build("mmcr").train()
    batch = _views()
    outputs = objective(batch)
    # BN in training mode: recompute with the same batch composition (all k views in one pass).
    images = torch.stack([batch[f"view{i}"] for i in range(VIEWS)], dim=1).flatten(0, 1)
    z = objective.projector(objective.encoder.encode_image(images)).view(8, VIEWS, -1)
    assert outputs["loss"].item() == pytest.approx(mmcr(z).item(), rel=1e-5)
    assert outputs["centroid_nuclear_norm"].item() == pytest.approx(-mmcr(z).item(), rel=1e-5)
    assert objective.projector[-1].bias is None


def test_emp_ssl_loss_is_on_normalised_patch_embeddings():
    objective = _build("emp_ssl").train()
    batch = _views()
    outputs = objective(batch)
    assert -outputs["loss"].item() == pytest.approx(
        outputs["coding_rate"].item() + 200 * outputs["patch_similarity"].item(), rel=1e-5)
    # Scaling the projector's output changes nothing once the embeddings are L2-normalised.
    with torch.no_grad():
        objective.projector[-1].weight.mul_(10.0)
        objective.projector[-1].bias.mul_(10.0)
    assert objective(batch)["loss"].item() == pytest.approx(outputs["loss"].item(), rel=1e-5)


def test_wmse_permutations_follow_the_step_and_survive_a_checkpoint():
    objective = _build("wmse")
    first = objective.permutations(16)
    # The permutations do not depend on torch's global seed (every process draws the same).
    assert all(torch.equal(a, b) for a, b in zip(first, _build("wmse", init_seed=5).permutations(16)))
    objective.after_step(0, 10)
    second = objective.permutations(16)
    assert objective.permutation_step.item() == 1 and not torch.equal(first[0], second[0])
    restored = _build("wmse", init_seed=3)
    restored.load_state_dict(objective.state_dict())
    assert torch.equal(restored.permutations(16)[0], second[0])
    assert not torch.equal(_build("wmse", seed=1).permutations(16)[0], first[0])  # the option seeds them


def test_wmse_shrinks_a_singular_sub_batch_with_a_warning():
    objective = _build("wmse", w_size=6, projection_dim=4).train()
    with pytest.warns(RuntimeWarning, match="singular covariance"):
        outputs = objective(_views(n=4))  # 4 rows for 4 dimensions
    assert outputs["whitening_shrink"].item() == pytest.approx(0.1) and torch.isfinite(outputs["loss"])
    assert _build("wmse").train()(_views(n=8))["whitening_shrink"].item() == 0.0  # 8 rows > 4 dimensions


@pytest.mark.parametrize("key,options,match", [
    ("mmcr", {"num_views": 1}, "num_views must be >= 2"),
    ("mmcr", {"lambd": -1.0}, "lambd must be >= 0"),
    ("mmcr", {"augment": {"crop": 0.5}}, "augment"),
    ("wmse", {"w_size": 4}, "w_size must exceed projection_dim"),
    ("wmse", {"w_eps": 1.5}, r"w_eps must be in \[0, 1\)"),
    ("wmse", {"w_iter": 0}, "w_iter must be >= 1"),
    ("wmse", {"seed": -1}, "seed must be >= 0"),
    ("frossl", {"invariance_weight": -1.0}, "invariance_weight must be >= 0"),
    ("frossl", {"num_views": 1}, "num_views must be >= 2"),
    ("emp_ssl", {"eps_squared": 0.0}, "eps_squared must be > 0"),
    ("emp_ssl", {"eps_squared": "a lot"}, "eps_squared must be a number"),
    ("emp_ssl", {"num_patches": 1}, "num_patches must be >= 2"),
])
def test_bad_options_are_clear_errors(key, options, match):
    with pytest.raises(ValueError, match=match):
        _build(key, **options)


# ---- two processes = one process on the concatenated batch ----

class _AllFour(torch.nn.Module):
    """The four objectives side by side, so one pair of spawned processes checks them all (spawning costs seconds).
    Their parameters are disjoint, so the gradients compared for each objective's parameters are those of its own
    loss; the summed loss has terms of similar size (EMP-SSL's lambda lowered to 1)."""

    def __init__(self):
        super().__init__()
        self.parts = torch.nn.ModuleDict({key: _build(key, **({"invariance_weight": 1.0} if key == "emp_ssl" else {}))
                                          for key in KEYS})

    def forward(self, batch: dict) -> dict:
        return {"loss": sum(part(batch)["loss"] for part in self.parts.values())}

    def after_step(self, step: int, total_steps: int) -> None:
        for part in self.parts.values():
            part.after_step(step, total_steps)


def _two_process_batch(step: int = 0) -> dict:
    return _views(n=16, step=step)


def test_two_processes_equal_one_process(tmp_path):
    # 8 images per process. W-MSE: 16 global rows in sub-batches of 8 from one permutation of the global batch;
    # two steps, so the permutation changes in between (after_step) and must change alike on both processes.
    # Losses agree to rtol 1e-5 (the helper's loss check); gradients to its default 1e-3: float32 rounding between
    # the two batch splits moves MMCR's first-conv gradients by ~1e-4 relative (SVD backward amplifies it).
    assert_two_processes_match_one(_AllFour, _two_process_batch, tmp_path, steps=2)
