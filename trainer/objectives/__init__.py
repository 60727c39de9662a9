"""The objective registry. Importing this package registers every objective module listed here."""
from . import (  # noqa: F401  (registration)
    align_uniform, barlow_twins, byol, clip, cmc, colorization, context, counting, cpc, cpc2, curl, dino, exemplar,
    instdisc, invaspread, jigsaw, jigsaw_clustering, moco, moco2, moco3, multitask, patchnce, pixpro, rotation, simclr,
    simclr2, simsiam, supcon, swav,
)
from .base import Objective, ObjectiveSpec, get_objective, list_objectives, register

__all__ = ["Objective", "ObjectiveSpec", "get_objective", "list_objectives", "register"]
