"""Evolving Losses: search the ``multitask`` loss weights by evolution (the search: ``trainer.evolution``).

``python -m trainer.evolve --objective multitask --train-data ... --output RUN --population 6 --generations 3
--candidate-steps 200 [--train-winner --max-steps N]`` (the other flags are ``trainer/pretrain.py``'s).
Writes ``RUN/evolution.json`` and ``RUN/evolution.png`` and prints the winning weights as JSON; exit status 2
for a user error, 3 when the loss of the winner's full run became NaN or infinite (``trainer.exit_status``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.config import ConfigError, TrainConfig, add_arguments, config_from_args
from trainer.evolution import config_with_weights, evolve_weights
from trainer.exit_status import FAILURES, OK, exit_status
from trainer.loop import train

log = logging.getLogger("manyview.evolve")


def add_evolve_arguments(parser: argparse.ArgumentParser, flag: bool = True) -> None:
    """The search's flags; ``flag`` adds ``--evolve-weights`` (for trainer/pretrain.py)."""
    add = parser.add_argument
    if flag:
        add("--evolve-weights", action="store_true", help="multitask: search the task weights (Evolving Losses) "
            "before training, then train with the winner")
    add("--population", type=int, default=6, help="candidates per generation")
    add("--generations", type=int, default=3)
    add("--candidate-steps", type=int, default=200, help="training steps per candidate")
    add("--clusters", type=int, default=10, help="k of the k-means fitness")
    add("--fitness-samples", type=int, default=1000, help="training images embedded for the fitness")
    add("--mutation-sigma", type=float, default=0.5, help="std of the log-normal weight mutation")
    add("--evolve-seed", type=int, help="seed of mutation, selection and k-means (default: --seed)")


def evolve_from_args(config: TrainConfig, args: argparse.Namespace) -> TrainConfig:
    """Run the search with the parsed flags; returns ``config`` with the winning weights."""
    record = evolve_weights(config, args.population, args.generations, args.candidate_steps,
                            config.seed if args.evolve_seed is None else args.evolve_seed, args.clusters,
                            args.fitness_samples, args.mutation_sigma)
    return config_with_weights(config, record["best"]["weights"])


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="evolve", description=__doc__.splitlines()[0])
    add_arguments(parser)
    add_evolve_arguments(parser, flag=False)
    parser.add_argument("--train-winner", action="store_true", help="then train --max-steps/--epochs with the winner")
    args = parser.parse_args(argv)
    args.objective = args.objective or "multitask"
    if not args.train_winner and args.max_steps is None and args.epochs is None:
        args.max_steps = args.candidate_steps  # the full-run length is not needed for the search alone
    try:
        config = config_from_args(args)
    except ConfigError as error:
        parser.error(str(error))
    try:
        config = evolve_from_args(config, args)
        if args.train_winner:
            train(config)
    except FAILURES as error:
        return exit_status(error, log)
    weights = {k: v["weight"] for k, v in config.objective_options["tasks"].items()}
    print(json.dumps({"best_weights": weights, "evolution": os.path.join(config.output, "evolution.json")}))
    return OK


if __name__ == "__main__":
    sys.exit(main())
