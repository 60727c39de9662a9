"""multitask (a weighted sum of objectives on one shared backbone) and the Evolving Losses weight search:
the weighted sum against the separately computed losses, the shared backbone and its gradients, view
prefixing, checkpoints of the weights, clear errors, the Zipf fitness by hand, mutation, a tiny search and a
short learning run on CIFAR-10."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import trainer.objectives.multitask  # noqa: F401  (registration)
import trainer.objectives.rotation  # noqa: F401
from conftest import CIFAR_DIR, CIFAR_SKIP_REASON
from trainer.config import TrainConfig, load_recipe, recipe_path
from trainer.data.pipeline import collate
from trainer.data.shards import ShardSample
from trainer.evolution import cluster_fitness, mutate, normalise, tournament, zipf_kl, zipf_prior
from trainer.evolve import main as evolve_main
from trainer.objectives import ObjectiveSpec, get_objective
from trainer.objectives.multitask import MultitaskViews, split_batch

SIZE = 16
SMALL = {"simclr": {"projection_dim": 16, "projection_hidden_dim": 32},
         "barlow_twins": {"projection_dim": 16, "projection_hidden_dim": 32},
         "byol": {"projection_dim": 16, "projection_hidden_dim": 32, "predictor_hidden_dim": 32},
         "rotation": {"head_hidden_dim": 32}}


def _build(weights: dict, seed: int = 0, backbone: str = "cnn-small", extra: dict | None = None):
    torch.manual_seed(seed)
    tasks = {k: {"weight": w, "options": {**SMALL.get(k, {}), **(extra or {}).get(k, {})}} for k, w in weights.items()}
    return get_objective("multitask").build(ObjectiveSpec(backbone=backbone, image_size=SIZE, options={"tasks": tasks}))


def _batch(objective, n: int = 8) -> dict:
    """Real worker-side views of n random images, collated, plus the loop's shared label and id."""
    rng = np.random.default_rng(0)
    views = objective.views()
    torch.manual_seed(1)
    samples = []
    for i in range(n):
        image = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
        out = views(image, ShardSample(key=str(i), url=""))
        out.update(label=i % 3, id=i)
        samples.append(out)
    return collate(samples)


def test_views_are_prefixed_and_split_back_with_the_shared_keys():
    objective = _build({"simclr": 1.0, "rotation": 1.0})
    batch = _batch(objective, 4)
    assert set(batch) == {"simclr/view0", "simclr/view1", "rotation/image", "label", "id"}
    assert batch["simclr/view0"].shape == (4, 3, SIZE, SIZE)
    parts = split_batch(batch, ["simclr", "rotation"])
    assert set(parts["simclr"]) == {"view0", "view1", "label", "id"} and set(parts["rotation"]) == {"image", "label", "id"}
    assert parts["simclr"]["view1"] is batch["simclr/view1"] and parts["rotation"]["image"] is batch["rotation/image"]
    assert parts["rotation"]["label"] is batch["label"] and parts["simclr"]["id"] is batch["id"]
    recipe = MultitaskViews({"a": lambda image, sample: {"x": 1, "y": 2}, "b": lambda image, sample: {"x": 3}})
    assert recipe(None, None) == {"a/x": 1, "a/y": 2, "b/x": 3}
    assert split_batch({"a/x": 1, "a/y": 2, "b/x": 3, "id": 9}, ["a", "b"]) == {"a": {"x": 1, "y": 2, "id": 9},
                                                                               "b": {"x": 3, "id": 9}}


def test_loss_is_the_weighted_sum_of_the_task_losses_on_the_same_batch():
    objective = _build({"simclr": 0.3, "barlow_twins": 2.0}).train()
    batch = _batch(objective)
    outputs = objective(batch)
    parts = split_batch(batch, objective.task_keys)
    l1 = objective.tasks["simclr"](parts["simclr"])["loss"].item()  # each task alone, on its own views
    l2 = objective.tasks["barlow_twins"](parts["barlow_twins"])["loss"].item()
    assert outputs["loss/simclr"].item() == pytest.approx(l1, rel=1e-5)
    assert outputs["loss/barlow_twins"].item() == pytest.approx(l2, rel=1e-5)
    assert outputs["loss"].item() == pytest.approx(0.3 * l1 + 2.0 * l2, rel=1e-5)
    assert outputs["embedding_std"] == min(outputs["simclr/embedding_std"], outputs["barlow_twins/embedding_std"])


def test_one_backbone_is_shared_and_both_losses_reach_it():
    objective = _build({"simclr": 1.0, "barlow_twins": 1.0}).train()
    encoder = objective.encoder
    assert objective.tasks["simclr"].encoder is encoder and objective.tasks["barlow_twins"].encoder is encoder
    encoder_ids = {id(p) for p in encoder.parameters()}
    assert sum(id(p) in encoder_ids for p in objective.parameters()) == len(encoder_ids)
    assert not any(k.startswith("tasks.barlow_twins.encoder.") for k in objective.state_dict())  # stored once
    grouped = [id(p) for g in objective.parameter_groups(1e-4) for p in g["params"]]
    assert len(grouped) == len(set(grouped)) and set(grouped) == {id(p) for p in objective.parameters() if p.requires_grad}
    batch = _batch(objective)

    def encoder_grad(weights):
        objective.set_weights(weights)
        objective.zero_grad(set_to_none=True)
        objective(batch)["loss"].backward()
        return torch.cat([p.grad.flatten() for p in encoder.parameters()])

    g1, g2 = encoder_grad([1.0, 0.0]), encoder_grad([0.0, 1.0])
    assert g1.norm() > 0 and g2.norm() > 0 and (g1 - g2).norm() > 1e-3 * g1.norm()
    combined, expected = encoder_grad([0.5, 3.0]), 0.5 * g1 + 3.0 * g2  # backward is linear in the weights
    assert (combined - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_momentum_teacher_starts_from_the_shared_encoder():
    objective = _build({"simclr": 1.0, "byol": 1.0})
    byol = objective.tasks["byol"]
    shared = dict(objective.encoder.named_parameters())
    for name, param in byol.target_encoder.named_parameters():
        assert torch.equal(param, shared[name]) and not param.requires_grad
    objective.after_step(0, 10)  # the EMA follows the shared encoder (equal weights stay equal)
    assert all(torch.equal(p, shared[n]) for n, p in byol.target_encoder.named_parameters())


def test_weights_are_a_buffer_that_checkpoints_round_trip(tmp_path):
    objective = _build({"simclr": 1.0, "barlow_twins": 1.0})
    objective.set_weights({"simclr": 0.25, "barlow_twins": 3.0})
    torch.save(objective.state_dict(), tmp_path / "state.pt")
    restored = _build({"simclr": 1.0, "barlow_twins": 1.0}, seed=5)
    restored.load_state_dict(torch.load(tmp_path / "state.pt"))
    assert restored.task_weights() == {"simclr": 0.25, "barlow_twins": 3.0}
    assert torch.equal(next(restored.encoder.parameters()), next(objective.encoder.parameters()))


@pytest.mark.parametrize("tasks,message", [
    ({"no_such_objective": {}}, "unknown objective"),
    ({"simclr": {}, "clip": {}}, "different encoder"),
    ({"simclr": {}, "multitask": {}}, "cannot itself be 'multitask'"),
    ({"simclr": {"weight": -1.0}}, "weight must be finite and >= 0"),
    ({"simclr": {"weight": 0.0}}, "at least one task weight"),
    ({"simclr": {"weigth": 1.0}}, "must be a mapping with 'weight' and 'options'"),
    ({}, "at least one objective"),
])
def test_bad_tasks_are_clear_value_errors(tasks, message):
    with pytest.raises(ValueError, match=message):
        get_objective("multitask").build(ObjectiveSpec(backbone="cnn-small", image_size=SIZE, options={"tasks": tasks}))


def test_a_task_that_changes_its_encoder_is_refused():
    # moco3 freezes a ViT's patch projection; simclr would train it: one backbone cannot do both.
    with pytest.raises(ValueError, match="changes its encoder"):
        _build({"simclr": 1.0, "moco3": 1.0}, backbone="vit-tiny-cifar",
               extra={"moco3": {"projection_dim": 8, "projection_hidden_dim": 16, "predictor_hidden_dim": 16}})
    objective = _build({"simclr": 1.0, "barlow_twins": 1.0})
    for bad in ({"simclr": 1.0}, [1.0], [1.0, float("nan")], [0.0, 0.0]):
        with pytest.raises(ValueError):
            objective.set_weights(bad)


def test_recipe_is_rotation_plus_simclr_and_builds():
    config = load_recipe(recipe_path("multitask"), TrainConfig(objective="multitask"))
    spec = ObjectiveSpec(backbone="cnn-small", image_size=32, options=config.objective_options)
    objective = get_objective("multitask").build(spec)
    assert objective.task_keys == ["rotation", "simclr"] and objective.task_weights() == {"rotation": 1.0, "simclr": 1.0}


# ---- the Evolving Losses search ----

def test_zipf_fitness_by_hand():
    # Zipf over 4 ranks (s = 1): (1, 1/2, 1/3, 1/4) / (25/12) = (12, 6, 4, 3) / 25.
    assert zipf_prior(4) == pytest.approx([0.48, 0.24, 0.16, 0.12])
    # Sizes [4, 2, 1, 1] of 8: q = (1/2, 1/4, 1/8, 1/8); q/p = (25/24, 25/24, 25/32, 25/24), so
    # KL = (1/2 + 1/4 + 1/8) ln(25/24) + 1/8 ln(25/32) = 0.035719 - 0.030857 = 0.004862.
    assert zipf_kl([4, 2, 1, 1]) == pytest.approx(0.004862, abs=1e-6)
    assert zipf_kl([1, 4, 1, 2]) == pytest.approx(0.004862, abs=1e-6)  # sorted first
    assert zipf_kl([8, 0, 0, 0]) == pytest.approx(math.log(25 / 12))  # collapse: -ln p_1; empty clusters add 0
    assert zipf_kl([12, 6, 4, 3]) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        zipf_kl([0, 0])


def test_kmeans_fitness_finds_separated_clusters():
    rng = np.random.default_rng(0)
    centres = np.array([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]])
    points = np.concatenate([c + rng.normal(0, 0.1, (n, 2)) for c, n in zip(centres, (6, 3, 1))])
    fitness, sizes = cluster_fitness(points, 3, seed=0)
    assert sizes == [6, 3, 1] and fitness == pytest.approx(zipf_kl([6, 3, 1]))


def test_mutation_keeps_weights_positive_and_normalised_and_tournament_picks_the_fitter():
    rng = np.random.default_rng(0)
    weights = normalise([1.0, 3.0, 0.5])
    assert weights.sum() == pytest.approx(3.0)
    for _ in range(200):
        weights = mutate(weights, 1.0, rng)
        assert (weights > 0).all() and weights.sum() == pytest.approx(3.0)
    assert mutate([2.0, 6.0], 0.0, rng) == pytest.approx([0.5, 1.5])
    assert tournament([0.3, 0.1], rng) == 1 and tournament([0.3, 0.1, 0.2], rng, size=3) == 1


@pytest.mark.skipif(not CIFAR_DIR.exists(), reason=CIFAR_SKIP_REASON)
def test_tiny_evolution_writes_history_winner_and_plot(cifar_2k_shards, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(json.dumps({  # JSON is YAML
        "backbone": "cnn-small", "batch_size": 16, "data": {"image_size": SIZE, "num_workers": 0},
        "optim": {"optimizer": "adamw", "lr": 0.01, "warmup_steps": 0},
        "objective": {"tasks": {k: {"weight": 1.0, "options": SMALL[k]} for k in ("simclr", "barlow_twins")}}}))
    out = tmp_path / "evo"
    assert evolve_main(["--config", str(recipe), "--train-data", f"{cifar_2k_shards}/train-*.tar.gz", "--output", str(out),
                        "--population", "3", "--generations", "2", "--candidate-steps", "3", "--clusters", "4",
                        "--fitness-samples", "200", "--log-every", "1"]) == 0
    record = json.loads((out / "evolution.json").read_text())
    assert record["tasks"] == ["simclr", "barlow_twins"] and len(record["history"]) == 2
    for generation in record["history"]:
        assert len(generation["candidates"]) == 3
        for candidate in generation["candidates"]:
            assert sum(candidate["weights"].values()) == pytest.approx(2.0, abs=1e-4)
            assert sum(candidate["cluster_sizes"]) == 200 and candidate["fitness"] >= 0
    first, second = record["history"]
    assert first["candidates"][0]["weights"] == {"simclr": 1.0, "barlow_twins": 1.0}  # the recipe's, normalised
    elite = second["candidates"][0]
    assert elite["carried"] and elite["fitness"] == first["best_fitness"]  # kept, not retrained
    every = [c["fitness"] for g in record["history"] for c in g["candidates"]]
    assert record["best"]["fitness"] == min(every)
    with Image.open(out / "evolution.png") as plot:
        assert plot.format == "PNG" and plot.size[0] > 100


def test_multitask_asks_its_tasks_whether_the_run_needs_text_or_dense_slots():
    multitask = get_objective("multitask")
    assert multitask.needs_dense_ids({"tasks": {"rotation": {}, "instdisc": {"weight": 0.5}}})
    assert not multitask.needs_dense_ids({"tasks": {"rotation": {}, "simclr": None}})
    assert multitask.needs_text({"tasks": {"clip": {}, "rotation": {}}})
    assert not multitask.needs_text({"tasks": {"simclr": {}}})
