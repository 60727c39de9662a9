"""MoCo v1/v2/v3: momentum helpers, shuffling BN (split-BN on one process), the queue, the losses against
hand computations, checkpoints, two processes against one, and short learning runs on CIFAR-10."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import trainer.objectives.moco  # noqa: F401  (registration)
import trainer.objectives.moco2  # noqa: F401
import trainer.objectives.moco3  # noqa: F401
from conftest import CIFAR_DIR, CIFAR_SKIP_REASON
from distributed_helpers import assert_two_processes_match_one
from learning_helpers import assert_beats_floor
from trainer.distributed import shuffle_batch, unshuffle_batch
from trainer.objectives import ObjectiveSpec, get_objective
from trainer.objectives.moco import SplitBatchNorm, split_batch_norm
from trainer.objectives.momentum import ema_update_, momentum_at, momentum_copy

SIZE = 16
SMALL = {"moco": {"queue_size": 32, "projection_dim": 16, "bn_splits": 2},
         "moco2": {"queue_size": 32, "projection_dim": 16, "bn_splits": 2, "projection_hidden_dim": 32},
         "moco3": {"projection_dim": 16, "projection_hidden_dim": 32, "predictor_hidden_dim": 32}}


def _build(key: str, seed: int = 0, **options):
    torch.manual_seed(seed)
    spec = ObjectiveSpec(backbone="cnn-small", image_size=SIZE, options={**SMALL[key], **options})
    return get_objective(key).build(spec)


def _views(n: int = 8, seed: int = 1, step: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed + 100 * step)
    return {f"view{i}": torch.randn(n, 3, SIZE, SIZE, generator=generator) for i in range(2)}


def test_momentum_schedule_is_cosine_from_base_to_final():
    assert momentum_at(0, 100, 0.99) == pytest.approx(0.99)
    assert momentum_at(50, 100, 0.99) == pytest.approx(0.995)
    assert momentum_at(100, 100, 0.99) == pytest.approx(1.0)
    assert momentum_at(25, 100, 0.9, 0.95) == pytest.approx(0.95 - 0.05 * (math.cos(math.pi / 4) + 1) / 2)
    assert momentum_at(500, 100, 0.99) == 1.0 and momentum_at(-3, 100, 0.99) == pytest.approx(0.99)


def test_momentum_copy_and_ema_update():
    online = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    target = momentum_copy(online)
    assert all(not p.requires_grad for p in target.parameters())
    assert all(torch.equal(a, b) for a, b in zip(online.parameters(), target.parameters()))
    before = [p.clone() for p in target.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    target[1].running_mean.fill_(7.0)
    ema_update_(target, online, 0.9)
    for old, new, q in zip(before, target.parameters(), online.parameters()):
        assert torch.allclose(new, 0.9 * old + 0.1 * q)
    assert torch.equal(target[1].running_mean, torch.full((2,), 7.0))  # buffers are the target's own
    with pytest.raises(ValueError):
        ema_update_(target, torch.nn.Linear(3, 2), 0.9)


def test_shuffle_then_unshuffle_restores_the_order():
    x = torch.arange(12.0).view(6, 2)
    shuffled, restore = shuffle_batch(x, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(shuffled, x) and sorted(shuffled[:, 0].tolist()) == x[:, 0].tolist()
    assert torch.equal(unshuffle_batch(shuffled, restore), x)
    assert torch.equal(unshuffle_batch(shuffled * 10, restore), x * 10)  # row-wise work is routed back


def test_split_batch_norm_is_batch_norm_per_group_and_differs_from_full_batch():
    x = torch.randn(8, 3, 4, 4) * torch.arange(1.0, 9.0).view(8, 1, 1, 1)  # groups with different scales
    weight, bias = torch.randn(3), torch.randn(3)
    out, mean, var = split_batch_norm(x, 4, weight, bias)
    per_group = torch.cat([F.batch_norm(c, None, None, weight, bias, True) for c in x.chunk(4)])
    assert torch.allclose(out, per_group, atol=1e-5)
    assert torch.allclose(mean[1], x[2:4].mean((0, 2, 3))) and torch.allclose(var[1], x[2:4].var((0, 2, 3)))
    full = F.batch_norm(x, None, None, weight, bias, True)
    assert (out - full).abs().max() > 0.1  # group statistics are not the batch's
    one, _, _ = split_batch_norm(x, 1, weight, bias)
    assert torch.allclose(one, full, atol=1e-5)
    with pytest.raises(ValueError):
        split_batch_norm(x, 3, weight, bias)


def test_split_batch_norm_module_running_stats_and_eval():
    bn = torch.nn.BatchNorm1d(3)
    split = SplitBatchNorm(bn)
    x = torch.randn(8, 3)
    bn(x)
    split(x)  # groups = 1: exactly batch norm, running statistics included
    assert torch.allclose(split.running_mean, bn.running_mean) and torch.allclose(split.running_var, bn.running_var)
    split.groups = 2
    mean_before = split.running_mean.clone()
    split(x)
    expected = 0.9 * mean_before + 0.1 * torch.stack([x[:4].mean(0), x[4:].mean(0)]).mean(0)
    assert torch.allclose(split.running_mean, expected, atol=1e-6)
    split.eval()
    assert torch.allclose(split(x), F.batch_norm(x, split.running_mean, split.running_var, split.weight, split.bias))


def test_moco_keys_use_shuffled_groups_and_come_back_in_order():
    objective = _build("moco", bn_splits=4).train()
    images = _views(8)["view1"]
    torch.manual_seed(5)
    permutation = torch.randperm(8)
    reference = copy.deepcopy(_build("moco", shuffle_bn=False).train())  # same weights, plain batch norm
    expected = torch.empty(8, 16)
    for group in permutation.chunk(4):  # each key is its group's batch norm, wherever its row sits
        expected[group] = F.normalize(reference.key_projector(reference.key_encoder.encode_image(images[group])), dim=1)
    torch.manual_seed(5)
    keys = objective.keys(images)
    assert torch.allclose(keys, expected, atol=1e-5)
    full_batch = F.normalize(reference.key_projector(reference.key_encoder.encode_image(images)), dim=1)
    assert (keys - full_batch).abs().max() > 1e-3  # split-BN is not full-batch BN
    assert torch.allclose(_build("moco", bn_splits=1).keys(images), full_batch, atol=1e-5)  # one group: order only


@pytest.mark.parametrize("loss", ["infonce", "hcl"])
def test_moco_loss_is_infonce_over_the_queue(loss):
    objective = _build("moco", shuffle_bn=False, temperature=0.1, loss=loss)
    batch = _views(8)
    outputs = objective(batch)
    with torch.no_grad():
        q = F.normalize(objective.projector(objective.encoder.encode_image(batch["view0"])), dim=1)
        k = F.normalize(objective.key_projector(objective.key_encoder.encode_image(batch["view1"])), dim=1)
        positive, negatives = (q * k).sum(1), q @ objective.queue.t()
    if loss == "infonce":
        logits = torch.cat([positive[:, None], negatives], 1) / 0.1
        expected = F.cross_entropy(logits, torch.zeros(8, dtype=torch.long))
    else:  # Robinson et al.: importance-weighted negatives, tau+ = 0.1, beta = 1
        w = torch.softmax(negatives / 0.1, 1) * negatives.shape[1]
        ng = ((w * torch.exp(negatives / 0.1)).sum(1) - 0.1 * 32 * torch.exp(positive / 0.1)) / 0.9
        ng = torch.maximum(ng, 32 * torch.exp(torch.tensor(-1 / 0.1)))
        expected = (-torch.log(torch.exp(positive / 0.1) / (torch.exp(positive / 0.1) + ng))).mean()
    assert torch.allclose(outputs["loss"], expected, rtol=1e-4, atol=1e-5)


def test_moco_queue_is_fifo_and_filled_after_the_step():
    objective = _build("moco", queue_size=10)
    keys = [torch.full((4, 16), float(i)) for i in range(3)]
    for k in keys:
        objective.enqueue(k)
    assert objective.queue_ptr.item() == 2
    assert objective.queue[:2, 0].tolist() == [2.0, 2.0] and objective.queue[2:4, 0].tolist() == [0.0, 0.0]
    assert objective.queue[4:8, 0].tolist() == [1.0] * 4 and objective.queue[8:, 0].tolist() == [2.0, 2.0]
    objective = _build("moco")
    queue = objective.queue.clone()
    key_weight = objective.key_encoder.backbone.features[0].weight.clone()
    objective(_views(8))["loss"].backward()
    with torch.no_grad():
        objective.encoder.backbone.features[0].weight.add_(1.0)  # stands in for the optimizer step
    assert torch.equal(objective.queue, queue)  # nothing moves before the step
    objective.after_step(0, 10)
    assert objective.queue_ptr.item() == 8 and torch.equal(objective.queue[8:], queue[8:])
    assert torch.allclose(objective.queue[:8].norm(dim=1), torch.ones(8))
    expected = 0.999 * key_weight + 0.001 * objective.encoder.backbone.features[0].weight
    assert torch.allclose(objective.key_encoder.backbone.features[0].weight, expected)


@pytest.mark.parametrize("key", ["moco", "moco2", "moco3"])
def test_queue_and_key_encoder_survive_state_dict_save_and_load(key, tmp_path):
    objective = _build(key)
    for step in range(2):
        objective(_views(8, step=step))["loss"].backward()
        with torch.no_grad():
            for p in objective.encoder.parameters():
                p.add_(0.01 * torch.randn_like(p))
        objective.after_step(step, 10)
    torch.save(objective.state_dict(), tmp_path / "state.pt")
    restored = _build(key, seed=7)
    restored.load_state_dict(torch.load(tmp_path / "state.pt"))
    state, loaded = objective.state_dict(), restored.state_dict()
    names = [n for n in state if n.startswith(("queue", "key_encoder", "key_projector"))]
    assert any(n.startswith("key_encoder") for n in names) and (key == "moco3" or "queue" in names)
    assert all(torch.equal(state[n], loaded[n]) for n in names)
    if key != "moco3":
        assert restored.queue_ptr.item() == 16
    objective.eval(), restored.eval()
    batch = _views(8, step=5)
    assert torch.allclose(objective(batch)["loss"], restored(batch)["loss"])


def test_moco3_loss_is_symmetric_and_scaled_by_two_tau():
    objective = _build("moco3", temperature=0.5)
    batch = _views(8)
    outputs = objective(batch)
    with torch.no_grad():
        q1, q2 = (F.normalize(objective.predictor(objective.projector(objective.encoder.encode_image(batch[v]))), dim=1)
                  for v in ("view0", "view1"))
        k1, k2 = (F.normalize(objective.key_projector(objective.key_encoder.encode_image(batch[v])), dim=1)
                  for v in ("view0", "view1"))
    labels = torch.arange(8)
    expected = 2 * 0.5 * (F.cross_entropy(q1 @ k2.t() / 0.5, labels) + F.cross_entropy(q2 @ k1.t() / 0.5, labels))
    assert torch.allclose(outputs["loss"], expected, rtol=1e-4)


def test_moco3_momentum_follows_the_cosine_schedule_and_vit_patch_embed_is_frozen():
    objective = _build("moco3")
    key_before = objective.key_projector[0].weight.clone()
    with torch.no_grad():
        objective.projector[0].weight.add_(1.0)
    objective.after_step(4, 10)
    m = momentum_at(5, 10, 0.99)
    assert torch.allclose(objective.key_projector[0].weight, m * key_before + (1 - m) * objective.projector[0].weight)
    assert all(p.requires_grad for p in objective.encoder.parameters())
    with pytest.raises(ValueError, match="patch_embed"):
        _build("moco3", freeze_patch_embed=True)
    torch.manual_seed(0)
    vit = get_objective("moco3").build(ObjectiveSpec(backbone="vit-tiny-cifar", image_size=SIZE, options=SMALL["moco3"]))
    frozen = {n for n, p in vit.encoder.named_parameters() if not p.requires_grad}
    assert frozen == {"backbone.patch_embed.proj.weight", "backbone.patch_embed.proj.bias"}
    assert all(p.requires_grad for n, p in vit.encoder.named_parameters() if n not in frozen)


def _global_batch(step: int = 0) -> dict:
    return _views(16, step=step)


def _build_moco():  # module level: the two-process helper pickles these
    return _build("moco")


def _build_moco3():
    return _build("moco3")


@pytest.mark.parametrize("build", [_build_moco, _build_moco3])
def test_two_processes_equal_one_process(build, tmp_path):
    """moco: shuffling BN across processes (one BN group per process) equals split-BN with the same
    permutation on one process, and the queues stay identical; moco3: keys gathered across processes."""
    assert_two_processes_match_one(build, _global_batch, tmp_path, steps=2)


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_DIR.exists(), reason=CIFAR_SKIP_REASON)
@pytest.mark.parametrize("name,steps,objective_args", [
    # moco and moco3: tests/benchmarks/test_learning_checks.py (make benchmark), for the suite's time.
    ("moco2", 80, ["--objective", "moco2", "--optimizer", "adamw", "--lr", "4e-3", "--weight-decay", "1e-4",
                   "--set", "queue_size=1024", "--set", "projection_hidden_dim=256"]),
])
def test_short_run_beats_random_init_knn_floor(cifar_2k_shards, tmp_path, name, steps, objective_args):
    assert_beats_floor(cifar_2k_shards, tmp_path, name, steps, objective_args, 0.02)
