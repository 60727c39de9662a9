"""The objective registry. Importing this package registers every objective module listed here."""
from . import (  # noqa: F401  (registration)
    align_uniform, clip, cmc, curl, instdisc, invaspread, moco, moco2, moco3, simclr, simclr2, supcon,
)
from .base import Objective, ObjectiveSpec, get_objective, list_objectives, register

__all__ = ["Objective", "ObjectiveSpec", "get_objective", "list_objectives", "register"]
