"""The objective registry. Importing this package registers every objective module listed here."""
from . import align_uniform, clip, cmc, moco, moco2, moco3, simclr, simclr2, supcon  # noqa: F401  (registration)
from .base import Objective, ObjectiveSpec, get_objective, list_objectives, register

__all__ = ["Objective", "ObjectiveSpec", "get_objective", "list_objectives", "register"]
