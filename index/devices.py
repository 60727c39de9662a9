"""Where FAISS work runs: one GPU, all GPUs (sharded), or the CPU.

Everything here degrades to the CPU: with no GPU (``faiss.get_num_gpus() == 0``), ``use_gpu=False``,
an index type faiss cannot put on a GPU (HNSW, on-disk lists) or a failed copy (logged as a warning),
the CPU index itself is returned and used. Indexes are always written from their CPU copy.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# faiss GPU limits: k and nprobe up to 2048 (selection kernels); beyond that search on the CPU copy.
GPU_MAX_K = 2048
GPU_MAX_NPROBE = 2048


def gpu_count() -> int:
    """GPUs faiss can use (0 with the CPU build or without a device)."""
    import faiss

    try:
        return int(faiss.get_num_gpus())
    except AttributeError:  # faiss-cpu has no get_num_gpus
        return 0


def use_gpus(use_gpu: bool | None) -> int:
    """How many GPUs to use: all of them when ``use_gpu`` is None or True, none when False."""
    return 0 if use_gpu is False else gpu_count()


def _innermost(index: Any) -> Any:
    """The index inside IDMap / IDMap2 / pre-transform (OPQ) wrappers, which the GPU cloner copies through."""
    import faiss

    index = faiss.downcast_index(index)
    while isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexPreTransform)):
        index = faiss.downcast_index(index.index)
    return index


def gpu_supported(index: Any) -> bool:
    """Whether faiss can copy ``index`` to a GPU: Flat, IVF-Flat, IVF-PQ, IVF-SQ (and their wrappers),
    not HNSW and not IVF with on-disk / memory-mapped lists."""
    import faiss

    inner = _innermost(index)
    if isinstance(inner, faiss.IndexIVF):
        lists = faiss.downcast_InvertedLists(inner.invlists)
        if type(lists).__name__ != "ArrayInvertedLists":
            return False
    checker = getattr(faiss, "isGpuIndexImplemented", None)
    return bool(checker(inner)) if checker is not None else not isinstance(inner, faiss.IndexHNSW)


def _cloner_options(index: Any, multiple: bool) -> Any:
    import faiss

    options = faiss.GpuMultipleClonerOptions() if multiple else faiss.GpuClonerOptions()
    options.useFloat16 = True  # IVFPQ lookup tables beyond 48 bytes per code need float16 on the GPU
    if multiple:
        options.shard = True  # each GPU holds 1/n of the vectors; results are merged by faiss
    return options


def to_gpu(cpu_index: Any, use_gpu: bool | None = None, shard: bool = True) -> tuple[Any, Any]:
    """``(gpu_index, keep_alive)`` on GPU 0, or sharded over all GPUs; ``(cpu_index, None)`` otherwise.

    ``keep_alive`` (the GPU resources) must outlive the GPU index.
    """
    import faiss

    count = use_gpus(use_gpu)
    if count == 0:
        return cpu_index, None
    from index.store import shard_members

    members = shard_members(cpu_index)
    if members is not None:
        return _members_to_gpus(cpu_index, members, count)
    if not gpu_supported(cpu_index):
        logger.info("faiss cannot run %s on a GPU; it stays on the CPU", type(faiss.downcast_index(cpu_index)).__name__)
        return cpu_index, None
    try:
        if count > 1 and shard:
            gpu_index = faiss.index_cpu_to_all_gpus(cpu_index, _cloner_options(cpu_index, True))
            return gpu_index, gpu_index  # the python wrapper keeps the per-GPU resources referenced
        resources = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(resources, 0, cpu_index, _cloner_options(cpu_index, False)), resources
    except Exception as error:  # noqa: BLE001 - the CPU can always do the work
        logger.warning("faiss could not copy the index to the GPU (%s); using the CPU", error)
        return cpu_index, None


def _members_to_gpus(cpu_index: Any, members: list[Any], count: int) -> tuple[Any, Any]:
    """A set's members (``IndexShards``), member ``j`` on GPU ``j % count``: each member fits one device, which
    is why the collection is a set. Members faiss cannot move (on-disk lists) stay on the CPU."""
    import faiss

    placed = faiss.IndexShards(cpu_index.d, True, False)
    keep_alive: list[Any] = [placed]
    for number, member in enumerate(members):
        device = number % count
        if not gpu_supported(member):
            placed.add_shard(member)
            continue
        try:
            resources = faiss.StandardGpuResources()
            moved = faiss.index_cpu_to_gpu(resources, device, member, _cloner_options(member, False))
        except Exception as error:  # noqa: BLE001 - the CPU can always do the work
            logger.warning("faiss could not copy set member %d to GPU %d (%s); it stays on the CPU", number, device,
                           error)
            placed.add_shard(member)
            continue
        placed.add_shard(moved)
        keep_alive += [moved, resources]
    if len(keep_alive) == 1:
        return cpu_index, None
    return placed, keep_alive


def to_cpu(index: Any, keep_alive: Any) -> Any:
    """The CPU copy of ``index`` (itself when it never left the CPU); sharded GPU indexes are merged."""
    import faiss

    return index if keep_alive is None else faiss.index_gpu_to_cpu(index)


def train(cpu_index: Any, sample: np.ndarray, use_gpu: bool | None = None) -> Any:
    """Train ``cpu_index`` on ``sample`` (on GPU 0 when there is one); returns the trained CPU index.

    Training happens on one GPU so that every shard later shares the same quantizer.
    """
    if cpu_index.is_trained:
        return cpu_index
    index, keep_alive = to_gpu(cpu_index, use_gpu, shard=False)
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    return to_cpu(index, keep_alive)


def set_search_params(index: Any, params: dict) -> None:
    """Apply ``{"nprobe": 32}`` / ``{"efSearch": 64}`` through faiss's ParameterSpace (CPU or GPU,
    through IDMap, pre-transform and shard wrappers)."""
    import faiss

    if not params:
        return
    # GpuParameterSpace understands GPU indexes inside wrappers and falls back to the CPU rules
    space = faiss.GpuParameterSpace() if gpu_count() > 0 else faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, float(value))
        if name == "nprobe":
            _widen_hnsw_quantizer(index, int(value))


def _widen_hnsw_quantizer(index: Any, nprobe: int) -> None:
    """An HNSW coarse quantizer (``IVF<n>_HNSW32``) returns at most efSearch lists: keep it >= nprobe, or recall
    plateaus however far nprobe is raised."""
    import faiss

    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:  # no IVF inside (or a GPU index): nothing to widen
        return
    quantizer = faiss.downcast_index(ivf.quantizer)
    if isinstance(quantizer, faiss.IndexHNSW) and quantizer.hnsw.efSearch < nprobe:
        quantizer.hnsw.efSearch = nprobe


def exceeds_gpu_limits(k: int, params: dict) -> str | None:
    """Why a search must run on the CPU copy (None when the GPU can do it)."""
    if k > GPU_MAX_K:
        return f"k={k} > {GPU_MAX_K}"
    if int(params.get("nprobe", 0)) > GPU_MAX_NPROBE:
        return f"nprobe={params['nprobe']} > {GPU_MAX_NPROBE}"
    return None
