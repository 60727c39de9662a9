"""The training command lines' exit statuses (``trainer/pretrain.py``, ``python -m trainer.evolve``).

0: done; 2: a user error (bad flags exit through argparse with 2 as well; objectives and data raise
ValueError with a message meant for the user); 3: the loss became NaN or infinite (the last good checkpoint is
kept). Each command line wraps its work in ``try: ... except FAILURES as error: return exit_status(error, log)``.
"""
from __future__ import annotations

import logging

from trainer.loop import NonFiniteLoss

OK = 0
USER_ERROR = 2
NON_FINITE_LOSS = 3

FAILURES = (NonFiniteLoss, ValueError)


def exit_status(error: BaseException, logger: logging.Logger) -> int:
    """Log ``error`` (one of ``FAILURES``) and return the status its command line exits with."""
    logger.error("%s", error)
    return NON_FINITE_LOSS if isinstance(error, NonFiniteLoss) else USER_ERROR
