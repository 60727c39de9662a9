"""Evolving Losses (Piergiovanni, Angelova & Ryoo 2020): search the ``multitask`` loss weights by evolution.

The search itself; the command lines are ``python -m trainer.evolve`` and ``trainer/pretrain.py --evolve-weights``.

* A candidate is a weight vector over the recipe's tasks, kept positive and normalised to mean 1 (sum = number
  of tasks, so equal weights are the recipe's 1.0 each and the loss keeps its scale).
* Generation 0: the recipe's weights plus ``population - 1`` mutations of them. Each later generation keeps
  the best candidate (elitism: carried over with its fitness, not retrained) and fills the rest with mutations
  of parents picked by tournament selection (best of 2 drawn at random). Mutation: w_k <- w_k exp(sigma e_k),
  e_k ~ N(0, 1) (log-normal), then renormalised.
* Every candidate trains ``candidate_steps`` steps through the one loop (``trainer.loop.train``, in this
  process) from the same initial weights, data order and seed (``config.seed``); only the weights differ.
* Fitness (unsupervised, lower is better): embed the first ``fitness_samples`` training images (evaluation
  preprocessing, L2-normalised), cluster them with k-means (numpy, k-means++ init, seeded) into ``clusters``
  clusters, sort the cluster sizes in decreasing order into a distribution q, and take the KL divergence
  KL(q || p) = sum_i q_i log(q_i / p_i) to the Zipf prior p_i = i^-s / sum_j j^-s (s = ``zipf_exponent``, 1 by
  default). This direction stays finite when clusters are empty (q_i = 0 adds 0); a collapsed embedding (one
  cluster) scores log H_k, an even split is penalised too: the paper's prior is that natural classes are
  Zipf-distributed.

Writes ``RUN/evolution.json`` (every candidate's weights, fitness, sorted cluster sizes and parent, per
generation, and the winner), ``RUN/evolution.png`` (fitness per generation: the population and the best) and
the candidates' metrics under ``RUN/evolution/`` (their checkpoints and models are removed once scored).
The search runs in one process: Accelerate's ``end_training`` tears down the process group after each
candidate, so under ``accelerate launch`` with several processes it refuses; launch the full training with the
winning weights instead (``--set 'tasks={...}'`` or a recipe).
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import time

import numpy as np

from trainer.config import TrainConfig
from trainer.data.shards import expand_patterns
from trainer.evaluate import extract_features
from trainer.loop import NonFiniteLoss, train
from trainer.models import load_model

log = logging.getLogger("manyview.evolve")


def zipf_prior(k: int, exponent: float = 1.0) -> np.ndarray:
    """p_i = i^-s / sum_{j <= k} j^-s for ranks i = 1..k."""
    if k < 1:
        raise ValueError(f"zipf_prior: k must be >= 1, got {k}")
    ranks = np.arange(1, k + 1, dtype=np.float64)
    weights = ranks ** -float(exponent)
    return weights / weights.sum()


def zipf_kl(cluster_sizes, exponent: float = 1.0) -> float:
    """KL(q || Zipf) where q = the cluster sizes sorted decreasingly and normalised; 0 log 0 = 0."""
    sizes = np.sort(np.asarray(cluster_sizes, dtype=np.float64))[::-1]
    if sizes.size == 0 or sizes.sum() <= 0 or (sizes < 0).any():
        raise ValueError(f"zipf_kl: need non-negative cluster sizes with a positive total, got {list(cluster_sizes)}")
    q = sizes / sizes.sum()
    p = zipf_prior(len(q), exponent)
    nonzero = q > 0
    return float(np.sum(q[nonzero] * np.log(q[nonzero] / p[nonzero])))


def kmeans(x: np.ndarray, k: int, seed: int = 0, iterations: int = 50) -> np.ndarray:
    """Lloyd's k-means with k-means++ initialisation; returns a cluster index per row of x [N, D]."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    if n < 1 or k < 1:
        raise ValueError(f"kmeans: need >= 1 point and k >= 1, got {n} points, k={k}")
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(n)]]
    nearest = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, min(k, n)):
        total = nearest.sum()
        index = rng.choice(n, p=nearest / total) if total > 0 else rng.integers(n)  # identical points: any
        centres.append(x[index])
        nearest = np.minimum(nearest, ((x - x[index]) ** 2).sum(1))
    centres = np.stack(centres)
    squared = (x ** 2).sum(1, keepdims=True)
    labels = np.zeros(n, dtype=np.int64)
    for _ in range(iterations):
        labels = (squared - 2 * x @ centres.T + (centres ** 2).sum(1)[None]).argmin(1)
        updated = centres.copy()
        for j in range(len(centres)):
            members = labels == j
            if members.any():
                updated[j] = x[members].mean(0)
        if np.allclose(updated, centres):
            break
        centres = updated
    return labels


def cluster_fitness(features: np.ndarray, clusters: int, seed: int = 0, exponent: float = 1.0) -> tuple[float, list[int]]:
    """(KL of the sorted k-means cluster sizes to Zipf, the sorted sizes); empty clusters count as size 0."""
    labels = kmeans(features, clusters, seed)
    sizes = sorted(np.bincount(labels, minlength=clusters).tolist(), reverse=True)
    return zipf_kl(sizes, exponent), sizes


def normalise(weights) -> np.ndarray:
    """Positive weights scaled to mean 1 (sum = number of tasks)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all zero, got {list(np.ravel(w))}")
    return w * (w.size / w.sum())


def mutate(weights, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Log-normal perturbation w_k exp(sigma e_k), e_k ~ N(0, 1), renormalised; stays positive."""
    w = np.asarray(weights, dtype=np.float64) * np.exp(sigma * rng.standard_normal(len(weights)))
    return normalise(np.maximum(w, 1e-6))


def tournament(fitness: list[float], rng: np.random.Generator, size: int = 2) -> int:
    """Index of the fittest (lowest) of ``size`` candidates drawn without replacement."""
    drawn = rng.choice(len(fitness), size=min(size, len(fitness)), replace=False)
    return int(min(drawn, key=lambda i: fitness[i]))


def task_keys(config: TrainConfig) -> list[str]:
    if config.objective != "multitask":
        raise ValueError(f"evolving loss weights needs --objective multitask, got {config.objective!r}")
    tasks = config.objective_options.get("tasks") or {}
    if not isinstance(tasks, dict) or len(tasks) < 2:
        raise ValueError(f"evolving loss weights needs at least two tasks in objective.tasks, got {list(tasks)}")
    return list(tasks)


def config_with_weights(config: TrainConfig, weights: dict[str, float]) -> TrainConfig:
    """A copy of ``config`` whose multitask task weights are ``weights`` (task key -> weight)."""
    out = copy.deepcopy(config)
    tasks = out.objective_options["tasks"]
    for key, weight in weights.items():
        tasks[key] = {**(tasks.get(key) or {}), "weight": float(weight)}
    return out


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def score_candidate(config: TrainConfig, weights: dict[str, float], output: str, steps: int, clusters: int,
                    fitness_samples: int, seed: int, exponent: float) -> dict:
    """Train one candidate briefly and score its embedding; a run whose loss goes non-finite scores inf."""
    candidate = config_with_weights(config, weights)
    candidate.output, candidate.max_steps, candidate.epochs, candidate.time_budget = output, steps, None, None
    candidate.resume, candidate.checkpoint_every = False, 0
    shutil.rmtree(output, ignore_errors=True)
    started = time.perf_counter()
    result: dict = {"weights": weights}
    try:
        last = train(candidate)
        model, _ = load_model(os.path.join(output, "model"))
        features, _ = extract_features(model, expand_patterns(config.data.train_data), num_workers=config.data.num_workers,
                                       limit=fitness_samples, desc="fitness features")
        fitness, sizes = cluster_fitness(features.numpy(), clusters, seed, exponent)
        result.update(fitness=fitness, cluster_sizes=sizes, final_loss=last.get("loss"))
    except NonFiniteLoss as error:
        log.warning("candidate %s: %s", weights, error)
        result.update(fitness=math.inf, cluster_sizes=None, final_loss=None)
    finally:
        for name in ("checkpoints", "model"):  # keep metrics.jsonl and train_config.json only
            shutil.rmtree(os.path.join(output, name), ignore_errors=True)
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def evolve_weights(config: TrainConfig, population: int, generations: int, candidate_steps: int, seed: int,
                   clusters: int = 10, fitness_samples: int = 1000, sigma: float = 0.5,
                   zipf_exponent: float = 1.0) -> dict:
    """Run the search (module docstring); writes evolution.json and evolution.png in ``config.output``
    and returns the same record: ``tasks``, settings, ``history`` (per generation: ``candidates``, each with
    ``weights``, ``fitness``, ``cluster_sizes``, ``parent``, ``carried``) and ``best``."""
    keys = task_keys(config)
    if population < 2 or generations < 1 or candidate_steps < 1 or clusters < 2 or fitness_samples < clusters:
        raise ValueError(f"evolve: need population >= 2, generations >= 1, candidate_steps >= 1, clusters >= 2 and "
                         f"fitness_samples >= clusters; got {population}, {generations}, {candidate_steps}, "
                         f"{clusters}, {fitness_samples}")
    if _world_size() > 1:
        raise ValueError("evolve: run the weight search in one process (each candidate's run ends Accelerate's "
                         "process group); then launch the full training with the winning weights")
    rng = np.random.default_rng(seed)
    start = normalise([float((config.objective_options["tasks"][k] or {}).get("weight", 1.0)) for k in keys])
    genomes = [start] + [mutate(start, sigma, rng) for _ in range(population - 1)]
    parents: list[int | None] = [None] * population
    carried: dict[int, dict] = {}
    record = {"tasks": keys, "population": population, "generations": generations, "candidate_steps": candidate_steps,
              "seed": seed, "train_seed": config.seed, "clusters": clusters, "fitness_samples": fitness_samples,
              "mutation_sigma": sigma, "zipf_exponent": zipf_exponent,
              "fitness": "KL(q || Zipf(s)) of the sorted k-means cluster-size distribution q; lower is better",
              "history": []}
    best: dict | None = None
    for generation in range(generations):
        candidates = []
        for index, genome in enumerate(genomes):
            weights = {k: round(float(w), 6) for k, w in zip(keys, genome)}
            if index in carried:
                entry = {**carried[index], "carried": True}
            else:
                output = os.path.join(config.output, "evolution", f"gen{generation:02d}_cand{index:02d}")
                log.info("generation %d candidate %d: weights %s", generation, index, weights)
                entry = {**score_candidate(config, weights, output, candidate_steps, clusters, fitness_samples, seed,
                                           zipf_exponent), "carried": False}
                log.info("generation %d candidate %d: fitness %.5f", generation, index, entry["fitness"])
            entry.update(generation=generation, candidate=index, parent=parents[index])
            candidates.append(entry)
        fitness = [c["fitness"] for c in candidates]
        leader = int(np.argmin(fitness))
        if best is None or fitness[leader] < best["fitness"]:
            best = {k: candidates[leader][k] for k in ("weights", "fitness", "generation", "candidate", "cluster_sizes")}
        record["history"].append({"generation": generation, "candidates": candidates, "best_fitness": fitness[leader]})
        if generation + 1 < generations:  # elitism + tournament selection + log-normal mutation
            chosen = [tournament(fitness, rng) for _ in range(population - 1)]
            genomes = [genomes[leader]] + [mutate(genomes[i], sigma, rng) for i in chosen]
            parents = [leader] + chosen
            kept = ("weights", "fitness", "cluster_sizes", "final_loss")
            carried = {0: {**{k: candidates[leader][k] for k in kept}, "seconds": 0.0}}
        record["best"] = best
        _write(record, config.output)  # after every generation: an interrupted search keeps its history
    return record


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # a candidate whose loss went non-finite
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _write(record: dict, output: str) -> None:
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, "evolution.json"), "w", encoding="utf-8") as handle:
        json.dump(_json_safe(record), handle, indent=2)
    plot_evolution(record, os.path.join(output, "evolution.png"))
    log.info("wrote %s and evolution.png; best weights so far %s (fitness %.5f)",
             os.path.join(output, "evolution.json"), record["best"]["weights"], record["best"]["fitness"])


def plot_evolution(record: dict, path: str) -> None:
    """Fitness per generation: every candidate (dots), the generation's best and the best so far (lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    best_so_far, running = [], math.inf
    for entry in record["history"]:
        values = [c["fitness"] for c in entry["candidates"] if math.isfinite(c["fitness"])]
        axes.scatter([entry["generation"]] * len(values), values, color="0.6", s=18,
                     label="population" if entry["generation"] == 0 else None)
        running = min(running, entry["best_fitness"])
        best_so_far.append(running)
    generations = [entry["generation"] for entry in record["history"]]
    axes.plot(generations, [entry["best_fitness"] for entry in record["history"]], "o-", color="C0", label="generation best")
    axes.plot(generations, best_so_far, "--", color="C3", label="best so far")
    axes.set_xlabel("generation")
    axes.set_ylabel("KL(cluster sizes || Zipf)  (lower is better)")
    axes.set_xticks(generations)
    axes.set_title("Evolving Losses: " + " + ".join(record["tasks"]))
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
