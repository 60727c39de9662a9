"""The building blocks of a FAISS index that ``index.build``, ``index.merge``, ``index.add`` and ``index.evaluate``
share: the factory string checked and described (``resolve_choice``), an empty index with sample ids
(``new_index``), PCA stages trained to keep inner products (``uncentre_projections``) and rows gathered from a
source (``gather_rows``). A module of its own so that the multi-part builders (``index.merge``, ``index.ray_build``)
do not import ``index.build``, whose ``--engine ray`` runs them. No torch.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from index.select import IndexChoice, choose_index, describe_factory, train_size_for

METRIC = "inner_product"


def resolve_choice(count: int, dim: int, factory: str | None, max_memory: int | None,
                   query_batch: int = 1) -> IndexChoice:
    """``choose_index`` unless ``factory`` is given, in which case it is checked and described."""
    import faiss

    if factory is None:
        return choose_index(count, dim, max_memory, query_batch=query_batch)
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise ValueError(f"invalid --index factory string {factory!r} for dim {dim}: {str(error).strip()}") from error
    family = describe_factory(factory)
    ivf = _ivf(index)
    nlist = int(ivf.nlist) if ivf is not None else 0
    if ivf is not None and count < nlist:
        raise ValueError(f"{factory!r} has {nlist} inverted lists but the collection holds only {count} vectors")
    train = 0 if index.is_trained else train_size_for("ivfpq" if family in ("ivfpq", "other") else "ivf", count, nlist)
    return IndexChoice(factory, family, "--index given", 0, train, nlist)


def _ivf(index: Any) -> Any:
    import faiss

    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def new_index(dim: int, factory: str) -> Any:
    """An empty CPU index for ``factory`` (inner product); wrapped in ``IndexIDMap2`` unless it stores
    ids itself (IVF), so faiss ids are always sample ids."""
    import faiss

    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    # A re-ranking wrapper (",RFlat") holds an IVF inside but cannot take explicit ids itself.
    refine = isinstance(faiss.downcast_index(index), faiss.IndexRefine)
    if refine or (_ivf(index) is None and not hasattr(faiss.downcast_index(index), "id_map")):
        index = faiss.IndexIDMap2(index)
    return index


def uncentre_projections(index: Any, sample: np.ndarray) -> int:
    """Train the ``PCA<d>`` transforms of an inner-product ``index`` (inside IDMap / re-ranking wrappers)
    as projections that keep inner products; returns how many were trained so.

    Why: PCA keeps the top directions of the covariance and subtracts the training mean, and for inner
    products neither is right. <P(x - m), P(q - m)> ranks the stored x for a query shifted by -m; and
    embeddings sit in a cone around their mean, so the mean direction carries a large share of every
    inner product while varying little between vectors: PCA drops it, and <x, q> loses x's component
    along it times q's (large) one, which differs from x to x. The projection that best keeps <x, q>
    for queries like the data is onto the top eigenvectors of the second moment E[x x^T] (not the
    covariance): PCA of the sample together with its mirror image -x (whose mean is zero), with the bias
    dropped, so the transform is the linear map Px. Must run before the rest of the index is trained,
    so that its centroids and codebooks see the same transform.
    """
    import faiss

    inner = faiss.downcast_index(index)
    while isinstance(inner, (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexRefine)):
        inner = faiss.downcast_index(inner.base_index if isinstance(inner, faiss.IndexRefine) else inner.index)
    if not isinstance(inner, faiss.IndexPreTransform) or inner.metric_type != faiss.METRIC_INNER_PRODUCT:
        return 0
    changed, current = 0, np.ascontiguousarray(sample, dtype=np.float32)
    for position in range(inner.chain.size()):
        transform = faiss.downcast_VectorTransform(inner.chain.at(position))
        if not transform.is_trained:
            if isinstance(transform, faiss.PCAMatrix):
                transform.train(np.ascontiguousarray(np.concatenate([current, -current])))
                transform.b.resize(0)
                transform.have_bias = False
                changed += 1
            else:
                transform.train(current)
        current = transform.apply(current)
    return changed


def gather_rows(source: Any, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(vectors, ids)`` of the given global row numbers (sorted), in one pass over the source."""
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    vectors, ids, offset = [], [], 0
    for block, table in source.blocks():
        inside = rows[(rows >= offset) & (rows < offset + len(block))] - offset
        if len(inside):
            vectors.append(block[inside])
            ids.append(table.column("id").to_numpy()[inside])
        offset += len(block)
    if not vectors:
        return np.zeros((0, source.dim), dtype=np.float32), np.zeros(0, dtype=np.int64)
    return np.concatenate(vectors).astype(np.float32), np.concatenate(ids).astype(np.int64)
