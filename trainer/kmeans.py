"""k-means over a memory of embeddings with faiss (``faiss.Kmeans``): DeepCluster-v2's per-epoch clustering and
SMoG's group (re-)initialisation.

``kmeans(features, k, iterations, seed, spherical)`` returns the centroids [k, D] and each row's nearest centroid
[N]. Spherical k-means (the default, as both papers cluster L2-normalised embeddings) normalises the rows first,
keeps unit centroids and assigns by the largest inner product; plain k-means assigns by L2 distance. faiss runs on
one GPU when it sees any (the faiss-gpu build), else on the CPU; a seed fixes the initial centroids (and any
subsampling), so a call is deterministic on the CPU.

This function knows nothing of processes: an objective that trains on several processes runs it on one (rank 0)
over the memory every process holds and broadcasts the result (``trainer.objectives.deepcluster_v2``).
"""
from __future__ import annotations

import faiss
import numpy as np
import torch


def _as_float32_rows(features: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(np.asarray(features, dtype=np.float32))


def kmeans(features: np.ndarray | torch.Tensor, k: int, iterations: int = 10, seed: int = 0,
           spherical: bool = True) -> tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]:
    """Cluster ``features`` into ``k`` groups.

    Args:
        features: [N, D] embeddings (numpy array or tensor on any device), N >= k.
        k: number of centroids (>= 1).
        iterations: Lloyd iterations (DeepCluster-v2: 10).
        seed: seeds faiss's random choice of the initial centroids.
        spherical: cluster the L2-normalised rows on the unit sphere (cosine similarity); False: Euclidean k-means.
    Returns:
        ``(centroids [k, D] float32, assignments [N] int64)``: tensors on ``features``' device for a tensor input,
        numpy arrays otherwise. With ``spherical`` the centroids have unit norm.
    """
    rows = _as_float32_rows(features)
    if rows.ndim != 2 or rows.shape[1] < 1:
        raise ValueError(f"kmeans expects features [N, D] with D >= 1, got shape {tuple(rows.shape)}")
    count, dim = rows.shape
    if k < 1 or iterations < 1:
        raise ValueError(f"kmeans needs k >= 1 and iterations >= 1, got k={k}, iterations={iterations}")
    if k > count:
        raise ValueError(f"kmeans: k={k} centroids need at least k rows, got {count} (D={dim}); "
                         f"use fewer centroids or a larger memory")
    if not np.isfinite(rows).all():
        raise ValueError("kmeans: features contain NaN or infinite values")
    if spherical:
        rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    # min_points_per_centroid=1: small memories (tests, the first epoch of a small set) are legitimate here and
    # faiss would otherwise print a warning per call; the default subsampling cap (256 rows per centroid) stays.
    clustering = faiss.Kmeans(dim, int(k), niter=int(iterations), seed=int(seed), spherical=bool(spherical),
                              min_points_per_centroid=1, gpu=1 if faiss.get_num_gpus() > 0 else False)
    clustering.train(rows)
    centroids = np.ascontiguousarray(clustering.centroids, dtype=np.float32).reshape(k, dim)
    _, nearest = clustering.index.search(rows, 1)  # the index holds the final centroids (IP if spherical, else L2)
    assignments = nearest[:, 0].astype(np.int64)
    if isinstance(features, torch.Tensor):
        return (torch.from_numpy(centroids).to(features.device),
                torch.from_numpy(assignments).to(features.device))
    return centroids, assignments
