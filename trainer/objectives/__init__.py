"""The objective registry. Importing this package registers every objective module listed here."""
from . import (  # noqa: F401  (registration)
    align_uniform, barlow_twins, byol, clip, cmc, cpc, cpc2, curl, dino, instdisc, invaspread, moco, moco2, moco3,
    patchnce, pixpro, simclr, simclr2, simsiam, supcon, swav,
)
from .base import Objective, ObjectiveSpec, get_objective, list_objectives, register

__all__ = ["Objective", "ObjectiveSpec", "get_objective", "list_objectives", "register"]
