"""DeepCluster-v2, SMoG and FastSiam: faiss k-means on hand-made clusters, the three losses and SMoG's momentum
grouping against hand-worked numbers, the objectives' memories, clustering / reset schedules, frozen prototypes,
checkpoints, option errors, and two processes against one."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from distributed_helpers import assert_two_processes_match_one

import trainer.objectives.deepcluster_v2  # registration of the three keys
import trainer.objectives.fastsiam
import trainer.objectives.smog  # noqa: F401
from trainer.data.views import ManyViews
from trainer.kmeans import kmeans
from trainer.losses.deepcluster import deepcluster_v2_loss
from trainer.losses.fastsiam import fastsiam_loss
from trainer.losses.noncontrastive import negative_cosine
from trainer.losses.smog import assign_groups, momentum_update_groups, smog_loss
from trainer.objectives import ObjectiveSpec, get_objective

SIZE, LOCAL, N = 16, 8, 8
SMALL = {
    "deepcluster_v2": {"projection_dim": 8, "projection_hidden_dim": 16, "num_prototypes": [3, 4],
                       "num_local_crops": 1, "local_crop_size": LOCAL, "cluster_every_steps": 1},
    "smog": {"projection_dim": 8, "projection_hidden_dim": 16, "predictor_hidden_dim": 16, "num_groups": 4,
             "memory_size": 24, "reset_every_steps": 2, "group_momentum": 0.5},
    "fastsiam": {"projection_dim": 8, "projection_hidden_dim": 16, "predictor_hidden_dim": 4},
}


def _build(key: str, seed: int = 0, num_train_samples: int | None = None, **options):
    torch.manual_seed(seed)
    spec = ObjectiveSpec(backbone="cnn-small", image_size=SIZE, num_train_samples=num_train_samples,
                         options={**SMALL[key], **options})
    return get_objective(key).build(spec)


def _crops(step: int = 0, n: int = N, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed + 100 * step)
    batch = {f"global{i}": torch.randn(n, 3, SIZE, SIZE, generator=generator) for i in range(2)}
    batch["local0"] = torch.randn(n, 3, LOCAL, LOCAL, generator=generator)
    batch["id"] = torch.randperm(n, generator=generator)
    return batch


def _views(step: int = 0, n: int = N, views: int = 2, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed + 100 * step)
    return {f"view{i}": torch.randn(n, 3, SIZE, SIZE, generator=generator) for i in range(views)}


# ---------------------------------------------------------------- k-means


def _three_blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """30 points in 3 tight blobs around the axes of R^3 (10 each) and their true blob."""
    rng = np.random.default_rng(seed)
    axes = np.eye(3, dtype=np.float32)
    points = np.concatenate([axis + 0.05 * rng.standard_normal((10, 3)) for axis in axes]).astype(np.float32)
    return points, np.repeat(np.arange(3), 10)


def test_kmeans_finds_three_obvious_clusters_and_is_deterministic():
    points, truth = _three_blobs()
    centroids, assignments = kmeans(points, 3, iterations=10, seed=0)
    assert centroids.shape == (3, 3) and centroids.dtype == np.float32 and assignments.dtype == np.int64
    # One label per blob, three different labels: the clustering is the blobs up to a renaming.
    labels = [set(assignments[truth == blob].tolist()) for blob in range(3)]
    assert all(len(label) == 1 for label in labels) and len(set.union(*labels)) == 3
    for blob in range(3):  # spherical: each centroid is the unit vector of its blob's axis
        centroid = centroids[assignments[truth == blob][0]]
        assert np.allclose(centroid, np.eye(3)[blob], atol=0.05)
        assert math.isclose(np.linalg.norm(centroid), 1, rel_tol=1e-5)
    again_centroids, again = kmeans(points, 3, iterations=10, seed=0)
    assert np.array_equal(again, assignments) and np.array_equal(again_centroids, centroids)
    tensors = kmeans(torch.from_numpy(points), 3, iterations=10, seed=0)  # tensors in, tensors out, same result
    assert torch.equal(tensors[0], torch.from_numpy(centroids))
    assert torch.equal(tensors[1], torch.from_numpy(assignments))


def test_kmeans_euclidean_centroids_are_the_blob_means():
    # Two blobs on one ray (same direction, radii 1 and 10): only Euclidean k-means can tell them apart.
    rng = np.random.default_rng(1)
    near = np.array([1.0, 1.0]) + 0.01 * rng.standard_normal((6, 2))
    far = np.array([10.0, 10.0]) + 0.01 * rng.standard_normal((6, 2))
    points = np.concatenate([near, far]).astype(np.float32)
    centroids, assignments = kmeans(points, 2, iterations=10, seed=0, spherical=False)
    assert len(set(assignments[:6])) == 1 and len(set(assignments[6:])) == 1 and assignments[0] != assignments[6]
    assert np.allclose(centroids[assignments[0]], near.mean(0), atol=1e-5)
    assert np.allclose(centroids[assignments[6]], far.mean(0), atol=1e-4)


def test_kmeans_rejects_bad_inputs_clearly():
    points, _ = _three_blobs()
    with pytest.raises(ValueError, match="k=31 centroids need at least k rows, got 30"):
        kmeans(points, 31)
    with pytest.raises(ValueError, match=r"features \[N, D\]"):
        kmeans(points[:, 0], 2)
    with pytest.raises(ValueError, match=r"features \[N, D\]"):
        kmeans(points.reshape(3, 10, 3), 2)
    with pytest.raises(ValueError, match="k >= 1"):
        kmeans(points, 0)
    broken = points.copy()
    broken[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        kmeans(broken, 2)


# ---------------------------------------------------------------- losses, by hand


def test_deepcluster_v2_loss_matches_a_hand_worked_example():
    # Set 0, tau 0.5: scores 0.5 ln 3 give logits ln 3 -> softmax (3/4, 1/4). Sample 0 (cluster 0): crop 0 -ln(3/4),
    # crop 1 -ln(1/4); sample 1 (cluster 1): crop 0 logits (0, 0) -> ln 2, crop 1 -ln(1/4). Mean of the four.
    half_ln3 = 0.5 * math.log(3.0)
    set0 = torch.tensor([[[half_ln3, 0.0], [0.0, 0.0]], [[0.0, half_ln3], [half_ln3, 0.0]]], requires_grad=True)
    expected0 = (math.log(4 / 3) + math.log(4) + math.log(2) + math.log(4)) / 4
    loss = deepcluster_v2_loss([set0], torch.tensor([[0, 1]]), temperature=0.5)
    assert math.isclose(loss.item(), expected0, rel_tol=1e-6)
    # Set 1 (3 prototypes, zero scores): sample 0 unassigned (-1) is left out; sample 1 costs ln 3 on both crops.
    set1 = torch.zeros(2, 2, 3, requires_grad=True)
    both = deepcluster_v2_loss([set0, set1], torch.tensor([[0, 1], [-1, 2]]), temperature=0.5)
    assert math.isclose(both.item(), (expected0 + math.log(3)) / 2, rel_tol=1e-6)
    both.backward()
    assert torch.all(set1.grad[:, 0] == 0) and torch.all(set1.grad[:, 1] != 0)  # no gradient from the ignored sample
    nobody = deepcluster_v2_loss([set1], torch.tensor([[-1, -1]]))
    assert nobody.item() == 0.0  # a set without assigned samples adds nothing (no 0 / 0)
    with pytest.raises(ValueError, match="assignments"):
        deepcluster_v2_loss([set0], torch.tensor([0, 1]))


def test_smog_assignment_and_momentum_update_by_hand():
    # Two unit groups e1, e2 and a third, (-1, 0), that no instance is near. x_a = (0.8, 0.6) and x_b = (1, 0) go
    # to group 0, x_c = (0.6, 0.8) to group 1. beta 0.9: g0 = 0.9 (1, 0) + 0.1 mean(x_a, x_b) = (0.99, 0.03),
    # g1 = 0.9 (0, 1) + 0.1 x_c = (0.06, 0.98); g2 keeps (-1, 0).
    groups = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    features = torch.tensor([[0.8, 0.6], [1.0, 0.0], [0.6, 0.8]])
    assignments = assign_groups(features, groups)
    assert assignments.tolist() == [0, 0, 1]
    updated = momentum_update_groups(groups, features, assignments, beta=0.9)
    assert torch.allclose(updated, torch.tensor([[0.99, 0.03], [0.06, 0.98], [-1.0, 0.0]]), atol=1e-6)
    assert torch.equal(groups, torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))  # the input is not modified
    assert torch.equal(momentum_update_groups(groups, features, assignments, beta=1.0), groups)
    with pytest.raises(ValueError, match="beta"):
        momentum_update_groups(groups, features, assignments, beta=1.5)


def test_smog_update_over_two_parts_with_summed_totals_equals_the_whole_batch():
    """reduce_sum sees per-group sums and counts; adding the other part's equals one call on the whole batch
    (what the objective's all-reduce does across processes), while the parts alone differ."""
    generator = torch.Generator().manual_seed(0)
    groups = F.normalize(torch.randn(5, 4, generator=generator), dim=1)
    features = F.normalize(torch.randn(12, 4, generator=generator), dim=1)
    assignments = assign_groups(features, groups)
    whole = momentum_update_groups(groups, features, assignments, beta=0.7)
    captured = []

    def capture(totals):
        captured.append(totals.clone())
        return totals

    momentum_update_groups(groups, features[6:], assignments[6:], 0.7, reduce_sum=capture)
    first = momentum_update_groups(groups, features[:6], assignments[:6], 0.7, reduce_sum=lambda t: t + captured[0])
    assert torch.allclose(first, whole, atol=1e-6)
    assert not torch.allclose(momentum_update_groups(groups, features[:6], assignments[:6], 0.7), whole, atol=1e-3)


def test_smog_loss_matches_a_hand_worked_example():
    # Groups (2, 0) and (0, 3) normalise to e1, e2; tau 0.5 turns cosines 1 / 0 into logits 2 / 0.
    # p = e1 with target 0: ln(1 + e^-2); p = e2 with target 0: ln(1 + e^2).
    groups = torch.tensor([[2.0, 0.0], [0.0, 3.0]], requires_grad=True)
    predictions = torch.tensor([[5.0, 0.0], [0.0, 0.5]], requires_grad=True)
    loss = smog_loss(predictions, groups, torch.tensor([0, 0]), temperature=0.5)
    assert math.isclose(loss.item(), (math.log1p(math.exp(-2)) + math.log1p(math.exp(2))) / 2, rel_tol=1e-6)
    loss.backward()
    assert groups.grad is None and predictions.grad.abs().sum() > 0  # groups are constants of the loss


def test_fastsiam_loss_matches_a_hand_worked_example():
    # z = (1, 0), (0, 1), (1, 1): the targets (means of the other two) are (0.5, 1), (1, 0.5), (0.5, 0.5).
    # p = (1, 0), (1, 0), (0, 1): cosines 0.5 / sqrt(1.25), 1 / sqrt(1.25), 1 / sqrt(2).
    projections = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]]], requires_grad=True)
    predictions = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]], [[0.0, 1.0]]], requires_grad=True)
    loss = fastsiam_loss(predictions, projections)
    expected = -(0.5 / math.sqrt(1.25) + 1 / math.sqrt(1.25) + 1 / math.sqrt(2)) / 3
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    loss.backward()
    assert projections.grad is None and predictions.grad.abs().sum() > 0  # the stop-gradient on the targets
    # Two views: the mean of the others is the other view, i.e. SimSiam's symmetric loss.
    generator = torch.Generator().manual_seed(0)
    p, z = torch.randn(2, 5, 3, generator=generator), torch.randn(2, 5, 3, generator=generator)
    simsiam = 0.5 * negative_cosine(p[0], z[1]) + 0.5 * negative_cosine(p[1], z[0])
    assert torch.allclose(fastsiam_loss(p, z), simsiam, atol=1e-6)
    with pytest.raises(ValueError, match="V >= 2"):
        fastsiam_loss(p[:1], z[:1])


# ---------------------------------------------------------------- DeepCluster-v2


def test_deepcluster_v2_memory_kmeans_and_frozen_prototypes():
    objective = _build("deepcluster_v2", num_train_samples=N)
    assert not any("prototypes" in name for name, _ in objective.named_parameters())  # frozen: buffers
    first_targets = objective.assignments.clone()
    assert torch.equal(first_targets, _build("deepcluster_v2", seed=5, num_train_samples=N).assignments)  # seeded
    batch = _crops()
    out = objective(batch)
    assert torch.isfinite(out["loss"]) and out["clusterings"].item() == 0
    out["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in objective.encoder.parameters())
    objective.after_step(0, 10)  # memory written, then (cluster_every_steps 1) k-means of both sets
    assert objective.seen.all() and objective.clusterings.item() == 1
    crops = [batch["global0"], batch["global1"], batch["local0"]]
    with torch.no_grad():  # the projector's batch norm sees every crop at once, as in forward
        features = torch.cat([objective.encoder.encode_image(c) for c in crops])
        zs = F.normalize(objective.projector(features), dim=1).view(3, N, -1)
    for h, prototypes in enumerate(objective.prototype_sets()):
        memory = objective.memory[h % 2]  # set h clusters global crop h mod 2
        assert torch.allclose(prototypes.norm(dim=1), torch.ones(len(prototypes)), atol=1e-5)
        assert torch.equal(objective.assignments[h], (memory @ prototypes.t()).argmax(1))  # nearest centroid
        centroids, assigned = kmeans(memory, objective.sizes[h], 10, objective.options.seed + 2 * 1 + h)
        assert torch.allclose(prototypes, centroids, atol=1e-6) and torch.equal(objective.assignments[h], assigned)
    assert torch.allclose(objective.memory[:, batch["id"]], zs[:2], atol=1e-5)  # rows indexed by sample id
    # The next forward: cross-entropy of every crop's scores to the new assignments (tau 0.1).
    out = objective(batch)
    expected = sum(F.cross_entropy((zs @ p.t()).reshape(-1, p.shape[0]) / 0.1,
                                   objective.assignments[h, batch["id"]].repeat(3))
                   for h, p in enumerate(objective.prototype_sets())) / 2
    assert torch.allclose(out["loss"], expected, atol=1e-5)


def test_deepcluster_v2_clusters_once_per_epoch_and_skips_unseen_samples():
    spec = ObjectiveSpec(backbone="cnn-small", image_size=SIZE, num_train_samples=2 * N, global_batch_size=N,
                         options={**SMALL["deepcluster_v2"], "cluster_every_steps": None})
    torch.manual_seed(0)
    objective = get_objective("deepcluster_v2").build(spec)
    assert objective.cluster_every == 2  # one epoch = 16 samples / 8 per step
    half = _crops()
    half["id"] = torch.arange(N)
    objective(half)
    objective.after_step(0, 10)
    assert objective.clusterings.item() == 0  # mid-epoch: still the random first-epoch targets
    objective(half)  # the same 8 samples again: samples 8..15 stay unseen
    objective.after_step(1, 10)
    assert objective.clusterings.item() == 1
    assert (objective.assignments[:, N:] == -1).all() and (objective.assignments[:, :N] >= 0).all()


def test_deepcluster_v2_state_round_trips_through_state_dict():
    objective = _build("deepcluster_v2", num_train_samples=N)
    objective(_crops())
    objective.after_step(0, 10)
    restored = _build("deepcluster_v2", seed=3, num_train_samples=N)
    restored.load_state_dict(objective.state_dict())
    for name in ("memory", "seen", "assignments", "prototypes0", "prototypes1", "clusterings"):
        assert torch.equal(getattr(restored, name), getattr(objective, name)), name
    assert torch.allclose(restored(_crops(1))["loss"], objective(_crops(1))["loss"])


def test_deepcluster_v2_options_and_ids_fail_clearly():
    with pytest.raises(ValueError, match="number of training samples"):
        _build("deepcluster_v2")
    with pytest.raises(ValueError, match="num_prototypes"):
        _build("deepcluster_v2", num_train_samples=N, num_prototypes=[1])
    with pytest.raises(ValueError, match="temperature"):
        _build("deepcluster_v2", num_train_samples=N, temperature=0)
    with pytest.raises(ValueError, match="known fields"):
        _build("deepcluster_v2", num_train_samples=N, augment={"colour": 1})
    with pytest.raises(ValueError, match="given in epochs"):
        _build("deepcluster_v2", num_train_samples=N, cluster_every_steps=None)  # no batch size known
    with pytest.warns(UserWarning, match="exceed the 8 training samples"):
        assert _build("deepcluster_v2", num_train_samples=N, num_prototypes=[20]).sizes == [8]
    objective = _build("deepcluster_v2", num_train_samples=N)
    batch = _crops()
    batch["id"] = batch["id"] + 100
    with pytest.raises(ValueError, match="outside the memory.*dense slot"):
        objective(batch)


# ---------------------------------------------------------------- SMoG


def test_smog_groups_move_synchronously_then_reset_by_kmeans_on_schedule():
    objective = _build("smog", memory_size=40, reset_every_steps=3)
    start = objective.groups.clone()
    batch = _views()
    out = objective(batch)
    assert torch.isfinite(out["loss"]) and out["groups_from_kmeans"].item() == 0
    out["loss"].backward()
    assert all(p.grad is None for p in objective.target_encoder.parameters())
    # The groups the loss saw: the momentum update (beta 0.5) of the target features of both views.
    with torch.no_grad():
        targets = torch.cat([objective._target(batch["view0"]), objective._target(batch["view1"])])
    expected = momentum_update_groups(start, targets, assign_groups(targets, start), 0.5)
    assert torch.allclose(objective._pending[0], expected, atol=1e-6)
    assert torch.equal(objective.groups, start)  # committed only after the optimizer step
    with torch.no_grad():  # stands in for an optimizer step: the target is then no copy of the online network
        for p in objective.encoder.parameters():
            p.add_(0.05)
    objective.after_step(0, 10)  # memory: 16 >= 4 groups -> first k-means, target reset to the online network
    assert objective.memory_filled.item() == 16 and objective.groups_from_kmeans.item() == 1
    centroids, _ = kmeans(objective.memory[:16], 4, 10, seed=0 + 0 + 1)
    assert torch.allclose(objective.groups, centroids, atol=1e-6)
    assert all(torch.equal(t, o) for t, o in zip(objective.target_encoder.parameters(), objective.encoder.parameters()))
    kmeans_groups = objective.groups.clone()
    objective(_views(1))
    objective.after_step(1, 10)  # no reset: groups moved by momentum, target by EMA (momentum 0.99)
    assert not torch.allclose(objective.groups, kmeans_groups) and objective.memory_filled.item() == 32
    objective(_views(2))
    objective.after_step(2, 10)  # (2 + 1) % 3 == 0: reset over the ring memory (40 rows, wrapped)
    assert objective.memory_filled.item() == 40 and objective.memory_pointer.item() == 8
    centroids, _ = kmeans(objective.memory, 4, 10, seed=0 + 2 + 1)
    assert torch.allclose(objective.groups, centroids, atol=1e-6)


def test_smog_state_round_trips_and_options_fail_clearly():
    objective = _build("smog")
    objective(_views())
    objective.after_step(0, 10)
    restored = _build("smog", seed=3)
    restored.load_state_dict(objective.state_dict())
    for name in ("groups", "groups_from_kmeans", "memory", "memory_filled", "memory_pointer"):
        assert torch.equal(getattr(restored, name), getattr(objective, name)), name
    assert torch.allclose(restored(_views(1))["loss"], objective(_views(1))["loss"])
    with pytest.raises(ValueError, match="memory_size .* must be >= num_groups"):
        _build("smog", memory_size=3)
    with pytest.raises(ValueError, match="group_momentum"):
        _build("smog", group_momentum=1.5)
    with pytest.raises(ValueError, match="final_momentum"):
        _build("smog", momentum=0.999, final_momentum=0.99)
    with pytest.raises(ValueError, match="num_groups must be >= 2"):
        _build("smog", num_groups=1)


# ---------------------------------------------------------------- FastSiam


def test_fastsiam_four_views_each_against_the_mean_of_the_others():
    objective = _build("fastsiam")
    views = objective.views()
    assert isinstance(views, ManyViews) and views.keys() == ["view0", "view1", "view2", "view3"]
    batch = _views(views=4)
    out = objective(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and objective.predictor[0].weight.grad is not None
    with torch.no_grad():  # the same loss, written out: view i's prediction against the mean of the others
        z = torch.stack([objective.projector(objective.encoder.encode_image(batch[f"view{i}"])) for i in range(4)])
        p = torch.stack([objective.predictor(zi) for zi in z])
        expected = sum(-F.cosine_similarity(p[i], torch.cat([z[:i], z[i + 1:]]).mean(0), dim=1).mean()
                       for i in range(4)) / 4
    assert torch.allclose(out["loss"], expected, atol=1e-5)
    with pytest.raises(KeyError, match="view3"):
        objective({k: v for k, v in batch.items() if k != "view3"})
    with pytest.raises(ValueError, match="num_views must be >= 3"):
        _build("fastsiam", num_views=2)


# ---------------------------------------------------------------- two processes = one


def _build_deepcluster():  # module level: the two-process helper pickles these
    return _build("deepcluster_v2", num_train_samples=2 * N)


def _deepcluster_batch(step: int = 0) -> dict:
    batch = _crops(step, n=2 * N)
    batch["id"] = torch.arange(2 * N).roll(step)  # every sample once per step, each rank a different half
    return batch


def _build_smog():
    return _build("smog")


def _smog_batch(step: int = 0) -> dict:
    return _views(step, n=2 * N)


def _build_fastsiam():
    return _build("fastsiam")


def _fastsiam_batch() -> dict:
    return _views(n=2 * N, views=4)


@pytest.mark.parametrize("build,batch,steps,rtol,atol", [(_build_deepcluster, _deepcluster_batch, 2, 1e-5, 1e-5),
                                                         (_build_smog, _smog_batch, 3, 1e-5, 1e-4),
                                                         (_build_fastsiam, _fastsiam_batch, 1, 1e-5, 1e-5)],
                         ids=["deepcluster_v2", "smog", "fastsiam"])
def test_two_processes_equal_one_process(build, batch, steps, rtol, atol, tmp_path):
    """deepcluster_v2: the memory takes both ranks' rows, k-means on rank 0 is broadcast and the second step's
    targets come from it; smog: group sums and counts are all-reduced (beta 0.5, so a per-rank update would show),
    the first k-means (after step 0) and a reset (after step 1) are broadcast; fastsiam: gathered views.
    Losses match at rtol 1e-5 for all three (the helper's check), gradients too, with atol 1e-4 for smog: over
    its three steps the temperature-0.1 cross-entropies amplify the float32 rounding of global vs local batch norm
    to ~4e-5 absolute on gradients of size ~5 (under 1e-5 of the largest), more than a 1e-5 atol on entries
    near zero."""
    assert_two_processes_match_one(build, batch, tmp_path, steps=steps, rtol=rtol, atol=atol)
