"""The objective registry. Importing this package registers every objective module listed here."""
from . import (  # noqa: F401  (registration)
    aim, align_uniform, all4one, barlow_twins, byol, capi, clip, cmc, co2, coca, colorization, context, counting,
    cpc, cpc2, curl, dcl, deepcluster_v2, densecl, detcon, dino, dinov2, directclr, distill, emp_ssl, exemplar,
    fastsiam, frossl, ibot, ijepa, instdisc, invaspread, jigsaw, jigsaw_clustering, lejepa, lit, macl, mae, mmcr,
    moco, moco2, moco3, msn, multitask, nnbyol, nnclr, nnsiam, paka, patchnce, pixpro, ressl, rotation, siglip,
    simclr, simclr2, simmim, simsiam, smog, supcon, swav, tico, vibcreg, vicreg, vicregl, visreg, wmse,
)
from .base import Objective, ObjectiveSpec, get_objective, list_objectives, register

__all__ = ["Objective", "ObjectiveSpec", "get_objective", "list_objectives", "register"]
