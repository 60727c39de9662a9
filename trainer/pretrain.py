"""Pretrain an objective: ``accelerate launch trainer/pretrain.py --objective KEY --train-data ... --output RUN``.

The command line: parse the config, check the objective and the shards, optionally search multitask loss
weights (``--evolve-weights``), then run ``trainer.loop.train``. Exit status 0 when done, 2 for a user error,
3 when the loss became NaN or infinite (``trainer.exit_status``).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.config import ConfigError, add_arguments, config_from_args
from trainer.data.shards import ShardPatternError, expand_patterns
from trainer.evolve import add_evolve_arguments, evolve_from_args
from trainer.exit_status import FAILURES, OK, exit_status
from trainer.loop import train
from trainer.objectives import get_objective, list_objectives

log = logging.getLogger("manyview.pretrain")


def list_objectives_text() -> str:
    """One line per registered objective: its key and the first line of its module's docstring."""
    lines = []
    for key in list_objectives():
        doc = (sys.modules[get_objective(key).__module__].__doc__ or "").strip()
        lines.append(f"{key:16s} {doc.splitlines()[0] if doc else ''}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="pretrain", description=__doc__.splitlines()[0])
    add_arguments(parser)
    add_evolve_arguments(parser)  # --evolve-weights (multitask): the Evolving Losses search before training
    args = parser.parse_args(argv)
    if args.list_objectives:
        print(list_objectives_text())
        return OK
    try:
        config = config_from_args(args)
        get_objective(config.objective)
        expand_patterns(config.data.train_data)
    except (ConfigError, ShardPatternError, KeyError) as error:
        parser.error(str(error).strip("'\""))
    try:
        if args.evolve_weights:
            config = evolve_from_args(config, args)  # the search, then the full run with the winning weights
        train(config)
    except FAILURES as error:
        return exit_status(error, log)
    return OK


if __name__ == "__main__":
    sys.exit(main())
