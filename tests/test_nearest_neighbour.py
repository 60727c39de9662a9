"""Nearest-neighbour objectives (NNCLR, NNBYOL, NNSiam, All4One): the support-set queue (FIFO wrap-around,
look-up on hand-made rows, the empty-queue rule, checkpoints), the losses against hand-worked values, the
objectives' queue updates and momentum targets, and two processes against one."""
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from distributed_helpers import assert_two_processes_match_one

from trainer.losses.all4one import (
    centroid_contrast,
    feature_contrast,
    feature_correlation,
    neighbour_contrast,
)
from trainer.objectives import ObjectiveSpec, get_objective
from trainer.objectives.all4one import neighbour_position_code
from trainer.objectives.support_set import SupportSet

SIZE = 16
SMALL = {
    "nnclr": {"projection_dim": 16, "projection_hidden_dim": 32, "predictor_hidden_dim": 32, "queue_size": 20},
    "nnbyol": {"projection_dim": 16, "projection_hidden_dim": 32, "predictor_hidden_dim": 32, "queue_size": 20},
    "nnsiam": {"projection_dim": 16, "projection_hidden_dim": 32, "predictor_hidden_dim": 8, "queue_size": 20},
    "all4one": {"projection_dim": 16, "projection_hidden_dim": 32, "predictor_hidden_dim": 32, "queue_size": 20,
                "transformer_heads": 2, "transformer_hidden_dim": 32, "transformer_layers": 1},
}
KEYS = list(SMALL)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread is as fast, and immune to other processes' load (OpenMP spinning)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(key: str, seed: int = 0, **options):
    torch.manual_seed(seed)
    return get_objective(key).build(ObjectiveSpec(backbone="cnn-small", image_size=SIZE,
                                                  options={**SMALL[key], **options}))


def _views(n: int = 8, seed: int = 1, step: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed + 100 * step)
    return {f"view{i}": torch.randn(n, 3, SIZE, SIZE, generator=generator) for i in range(2)}


def _step(objective, batch: dict, step: int = 0, total: int = 10) -> dict:
    outputs = objective(batch)
    outputs["loss"].backward()
    objective.after_step(step, total)
    return outputs


# ---- the support set ----

def test_support_set_is_a_fifo_that_wraps_around():
    support = SupportSet(5, 2)
    assert int(support.filled) == 0 and int(support.pointer) == 0
    support.enqueue(torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]]))  # stored L2-normalised
    assert torch.allclose(support.queue[:3], torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
    assert int(support.filled) == 3 and int(support.pointer) == 3
    support.enqueue(torch.tensor([[-1.0, 0.0], [0.0, -1.0], [0.8, 0.6], [-0.6, 0.8]]))
    # Rows 3 and 4 fill the end; the next two overwrite the oldest (rows 0 and 1); row 2 is still the first batch's.
    assert torch.allclose(support.queue, torch.tensor([[0.8, 0.6], [-0.6, 0.8], [0.6, 0.8], [-1.0, 0.0], [0.0, -1.0]]))
    assert int(support.filled) == 5 and int(support.pointer) == 2
    support.enqueue(torch.tensor([[float(i), 1.0] for i in range(7)]))  # longer than the queue: its newest 5 rows
    assert int(support.pointer) == 2 and int(support.filled) == 5
    expected = F.normalize(torch.tensor([[float(i), 1.0] for i in range(2, 7)]), dim=1)
    assert torch.allclose(support.queue[[2, 3, 4, 0, 1]], expected)


def test_nearest_neighbour_by_hand_among_the_filled_rows_only():
    support = SupportSet(6, 2)
    support.enqueue(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]]))  # rows 4 and 5 unfilled (zero)
    z = torch.tensor([[2.0, 0.1], [0.5, 1.0], [-1.0, -0.5], [0.0, -3.0]], requires_grad=True)
    # Cosines of z1 = (0.5, 1) / |.|: with (0, 1) 0.894, with (0.6, 0.8) (0.3 + 0.8) / 1.118 = 0.984 -> (0.6, 0.8).
    # z2 = (-1, -0.5): with (-1, 0) 0.894, with (0, 1) -0.447. z3 = (0, -3): best (-1, 0) and (1, 0) tie at 0
    # among filled rows, all negative otherwise; an unfilled zero row (cosine 0) must never be returned.
    nearest = support.nearest(z[:3])
    assert torch.allclose(nearest, torch.tensor([[1.0, 0.0], [0.6, 0.8], [-1.0, 0.0]]))
    assert not nearest.requires_grad
    assert torch.equal(support.nearest(7 * z[:3].detach()), nearest)  # cosine: scale-free
    top = support.nearest_k(z[1:2].detach(), 3)  # most similar first: 0.984, 0.894, then (1, 0) at 0.447
    assert torch.allclose(top[0], torch.tensor([[0.6, 0.8], [0.0, 1.0], [1.0, 0.0]]))
    assert (support.nearest(z[3:].detach()).abs().sum(dim=1) > 0.99).all()


def test_before_the_queue_has_k_rows_the_batch_is_its_own_support_set():
    support = SupportSet(10, 2)
    z = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, -2.0]])
    assert torch.allclose(support.nearest(z), F.normalize(z, dim=1))  # the nearest row is the row itself
    top = support.nearest_k(z, 2)  # itself, then its closest batch-mate
    assert torch.allclose(top[:, 0], F.normalize(z, dim=1))
    assert torch.allclose(top[:, 1], torch.tensor([[1.0, 0.0], [0.6, 0.8], [1.0, 0.0]]))
    support.enqueue(torch.tensor([[0.0, 1.0]]))  # one row: enough for k = 1, not for k = 2
    assert torch.allclose(support.nearest(z), torch.tensor([[0.0, 1.0]] * 3))
    assert torch.allclose(support.nearest_k(z, 2)[:, 0], F.normalize(z, dim=1))
    with pytest.raises(ValueError, match="fewer than k=4"):
        support.nearest_k(z, 4)


def test_support_set_round_trips_through_state_dict():
    support = SupportSet(4, 3)
    support.enqueue(torch.randn(3, 3))
    support.enqueue(torch.randn(2, 3))
    restored = SupportSet(4, 3)
    restored.load_state_dict(support.state_dict())
    assert set(support.state_dict()) == {"queue", "pointer", "filled"}
    assert torch.equal(restored.queue, support.queue)
    assert int(restored.pointer) == 1 and int(restored.filled) == 4
    z = torch.randn(5, 3)
    assert torch.equal(restored.nearest(z), support.nearest(z))


# ---- losses against hand-worked values ----

NN = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
PRED = torch.tensor([[3.0, 4.0], [0.0, 5.0]])
# Normalised, S = NN @ PRED^T = [[0.6, 0.0], [0.8, 1.0]]; -log(e^a / (e^a + e^b)) = log(1 + e^{(b - a)/t}).


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_neighbour_contrast_by_hand():
    t = 0.5
    neighbour_anchored = [_softplus((0.0 - 0.6) / t), _softplus((0.8 - 1.0) / t)]  # rows of S (eq. 2)
    prediction_anchored = [_softplus((0.8 - 0.6) / t), _softplus((0.0 - 1.0) / t)]  # columns of S (transposed)
    assert neighbour_contrast(NN, PRED, t, symmetric=False).item() == pytest.approx(sum(neighbour_anchored) / 2,
                                                                                     rel=1e-5)
    assert neighbour_contrast(NN, PRED, t).item() == pytest.approx(
        sum(neighbour_anchored + prediction_anchored) / 4, rel=1e-5)
    other = neighbour_contrast(NN, PRED, t, kind="debiased", tau_plus=0.1)
    assert torch.isfinite(other) and other.item() != pytest.approx(neighbour_contrast(NN, PRED, t).item())


def test_neighbour_contrast_gradient_reaches_the_predictions_only():
    predictions = PRED.clone().requires_grad_(True)
    neighbours = NN.clone().requires_grad_(True)
    neighbour_contrast(neighbours.detach(), predictions, 0.1).backward()
    assert predictions.grad is not None and predictions.grad.abs().sum() > 0 and neighbours.grad is None


def test_centroid_contrast_by_hand():
    t = 0.5
    identity = torch.eye(2)
    # centroids1 vs shifted2: S as above (rows anchored); centroids2 vs shifted1: the identity, positives 1 vs 0.
    first = (_softplus((0.0 - 0.6) / t) + _softplus((0.8 - 1.0) / t)) / 2
    second = _softplus((0.0 - 1.0) / t)
    assert centroid_contrast(NN, identity, identity, PRED, t).item() == pytest.approx((first + second) / 2, rel=1e-5)


def test_feature_contrast_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    # Columns normalised over the batch: a -> (1, 0), (0, 1); b -> (1, 0), (1, 1)/sqrt2.
    # C = [[1, 1/sqrt2], [0, 1/sqrt2]]: on-diagonal mean (0 + (1 - 1/sqrt2)^2) / 2, off-diagonal mean 1/4.
    r = 1 / math.sqrt(2)
    assert torch.allclose(feature_correlation(a, b), torch.tensor([[1.0, r], [0.0, r]]))
    on, off = (1 - r) ** 2 / 2, 0.25
    assert feature_contrast([(a, b)]).item() == pytest.approx(0.5 * (math.sqrt(on) + math.sqrt(off)), rel=1e-5)
    # Two pairs average inside each square root (the authors' form); (a, a) has C = identity.
    assert feature_contrast([(a, b), (a, a)]).item() == pytest.approx(
        0.5 * (math.sqrt(on / 2) + math.sqrt(off / 2)), rel=1e-5)


def test_feature_contrast_is_zero_at_the_optimum_and_scale_free_per_feature():
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], requires_grad=True)
    loss = feature_contrast([(z, z.detach() * 3)])
    assert loss.item() == pytest.approx(0.0, abs=1e-5)
    loss.backward()
    assert torch.isfinite(z.grad).all()
    a, b = torch.randn(6, 3), torch.randn(6, 3)
    scale = torch.tensor([5.0, 0.1, 2.0])  # each feature column rescaled: cosines between columns unchanged
    assert feature_contrast([(a * scale, b)]).item() == pytest.approx(feature_contrast([(a, b)]).item(), rel=1e-5)


def test_position_code_is_the_authors_sinusoid_over_the_feature_index():
    code = neighbour_position_code(5, 7)
    x = torch.arange(7, dtype=torch.float32)
    # Five slots -> six channels: frequencies 1, 10000^(-2/6), 10000^(-4/6); slots alternate sin, cos.
    assert code.shape == (5, 7)
    assert torch.allclose(code[0], x.sin()) and torch.allclose(code[1], x.cos())
    assert torch.allclose(code[2], (x * 10000 ** (-2 / 6)).sin(), atol=1e-6)
    assert torch.allclose(code[3], (x * 10000 ** (-2 / 6)).cos(), atol=1e-6)
    assert torch.allclose(code[4], (x * 10000 ** (-4 / 6)).sin(), atol=1e-6)


# ---- objectives ----

@pytest.mark.parametrize("key", KEYS)
def test_forward_backward_is_finite_and_the_queue_fills_after_the_step(key):
    objective = _build(key)
    batch = _views()
    outputs = objective(batch)
    assert int(objective.support_set.filled) == 0  # forward alone leaves the queue as it was
    outputs["loss"].backward()
    assert torch.isfinite(outputs["loss"]) and outputs["nn_similarity"].item() == pytest.approx(1.0, abs=1e-5)
    assert 0.0 < outputs["embedding_std"].item()
    for name, param in objective.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
        else:
            assert name.startswith("target_"), name
    objective.after_step(0, 10)
    assert int(objective.support_set.filled) == 8 and int(objective.support_set.pointer) == 8
    second = _step(objective, _views(step=1), step=1)
    assert torch.isfinite(second["loss"]) and second["nn_similarity"].item() < 0.999  # neighbours from the queue


def test_nnclr_enqueues_view_one_projections_and_not_in_eval():
    objective = _build("nnclr")
    batch = _views()
    with torch.no_grad():  # train-mode BN: the same projections as the step's own forward
        z1 = objective.projector(objective.encoder.encode_image(batch["view0"]))
    _step(objective, batch)
    assert torch.allclose(objective.support_set.queue[:8], F.normalize(z1, dim=1), atol=1e-6)
    objective.eval()
    with torch.no_grad():
        objective(_views(step=1))
    objective.after_step(1, 10)
    assert int(objective.support_set.filled) == 8


@pytest.mark.parametrize("key", ["nnbyol", "all4one"])
def test_momentum_target_feeds_the_queue_and_follows_the_online_network(key):
    objective = _build(key)
    batch = _views()
    with torch.no_grad():
        t1 = objective.target_projector(objective.target_encoder.encode_image(batch["view0"]))
    before = objective.target_projector[0].weight.detach().clone()
    outputs = objective(batch)
    outputs["loss"].backward()
    with torch.no_grad():  # a stand-in optimizer step, so the EMA has something to follow
        for param in objective.parameters():
            if param.grad is not None:
                param -= 0.1 * param.grad
    objective.after_step(0, 10)
    assert torch.allclose(objective.support_set.queue[:8], F.normalize(t1, dim=1), atol=1e-6)
    moved = objective.target_projector[0].weight - before
    assert 0 < moved.abs().max() < (objective.projector[0].weight - before).abs().max()


@pytest.mark.parametrize("key, plain", [("nnsiam", "simsiam"), ("nnbyol", "byol")])
def test_with_an_empty_queue_the_first_step_is_the_plain_method(key, plain):
    options = {name: value for name, value in SMALL[key].items() if name != "queue_size"}
    torch.manual_seed(0)
    reference = get_objective(plain).build(ObjectiveSpec(backbone="cnn-small", image_size=SIZE, options=options))
    objective = _build(key)
    batch = _views()
    assert objective(batch)["loss"].item() == pytest.approx(reference(batch)["loss"].item(), rel=1e-5)
    objective.after_step(0, 10)
    reference.after_step(0, 10)
    later = _views(step=1)
    assert objective(later)["loss"].item() != pytest.approx(reference(later)["loss"].item(), rel=1e-3)


def test_all4one_logs_its_three_terms_and_weights_them():
    objective = _build("all4one", transformer_dropout=0.0)
    outputs = objective(_views())
    o = objective.options
    total = (o.neighbour_weight * outputs["neighbour_loss"] + o.centroid_weight * outputs["centroid_loss"]
             + o.feature_weight * outputs["feature_loss"])
    assert outputs["loss"].item() == pytest.approx(total.item(), rel=1e-5)
    assert (o.neighbour_weight, o.centroid_weight, o.feature_weight) == (0.5, 0.5, 5.0)


@pytest.mark.parametrize("key", KEYS)
def test_queue_and_targets_round_trip_through_state_dict(key):
    objective = _build(key)
    for step in range(3):
        _step(objective, _views(step=step), step=step)
    state = objective.state_dict()
    assert {"support_set.queue", "support_set.pointer", "support_set.filled"} <= set(state)
    restored = _build(key, seed=5)
    restored.load_state_dict(state)
    assert torch.equal(restored.support_set.queue, objective.support_set.queue)
    assert int(restored.support_set.pointer) == 4 and int(restored.support_set.filled) == 20
    objective.eval()
    restored.eval()
    with torch.no_grad():
        batch = _views(step=9)
        assert restored(batch)["loss"].item() == pytest.approx(objective(batch)["loss"].item(), rel=1e-6)


@pytest.mark.parametrize("key, options, message", [
    ("nnclr", {"queue_size": 0}, "queue_size must be >= 1"),
    ("nnclr", {"temperature": 0}, "temperature must be > 0"),
    ("nnclr", {"loss": "hinge"}, "loss 'hinge' is not one of"),
    ("nnbyol", {"queue_size": 0}, "queue_size must be >= 1"),
    ("nnsiam", {"queue_size": -1}, "queue_size must be >= 1"),
    ("all4one", {"transformer_heads": 3}, "transformer_heads \\(3\\) must divide projection_dim \\(16\\)"),
    ("all4one", {"queue_size": 4}, "queue_size \\(4\\) must be >= num_neighbours \\(5\\)"),
    ("all4one", {"centroid_temperature": -1}, "centroid_temperature must be > 0"),
    ("all4one", {"feature_weight": -1}, "feature_weight must be >= 0"),
    ("all4one", {"transformer_dropout": 1.0}, "transformer_dropout must be in"),
])
def test_option_errors_are_clear(key, options, message):
    with pytest.raises(ValueError, match=f"{key}: {message}"):
        _build(key, **options)


# ---- two processes against one ----

def _two_process_build(key: str):
    options = {"transformer_dropout": 0.0} if key == "all4one" else {}
    return _build(key, **options)


def _global_views(step: int) -> dict:
    return _views(n=16, step=step)  # 8 rows per process


@pytest.mark.parametrize("key", ["nnclr", "all4one"])
def test_two_processes_match_one_across_a_queue_update(key, tmp_path):
    # Two steps: the second looks its neighbours up in the queue the first step's global batch filled. The helper
    # compares the losses at rtol 1e-5; gradients at its default 1e-3 (float32 sums in another order differ by
    # ~1e-5 relative on the first conv layer).
    assert_two_processes_match_one(functools.partial(_two_process_build, key), _global_views, tmp_path, steps=2)
