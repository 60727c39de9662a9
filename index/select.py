"""Choose a FAISS index from the collection size, the dimension and a memory budget.

    choice = choose_index(count=1_000_000, dim=128, max_memory=parse_memory("2G"))
    choice.factory      # "HNSW32"
    choice.reason       # why, in one sentence (stored in index.json)
    choose_index(1_000_000, 128, query_batch=1000).factory   # BATCHED_FACTORY for 4096 lists

The rules, in order (each estimate is the resident size of the built index; see ``estimate_bytes``):

1. ``Flat`` (exact) while the collection is small (``count <= EXACT_MAX``): a query costs count x dim
   multiply-adds, about a millisecond per core at 50,000 x 128, and exact results need no tuning.
2. Only for searches of many queries per call (``query_batch >= BATCH_MIN``): fast-scan IVF-PQ with
   exact re-ranking (``batched_factory``) while full vectors plus codes fit. Batching changes the
   winner: exact search over a batch is one BLAS matrix product, and HNSW walks its graph query by
   query with a cache miss per visited node, so on the 1M x 128 hard set (``tests/benchmarks/
   RESULTS_index.md``) HNSW is only 12-17x exact search for 1000-query batches although it is 57-100x
   at one query per call; fast-scan PQ scans 4-bit codes 32 at a time from SIMD registers and gains
   from batches (queries are grouped per inverted list), and the exact re-ranking of ``k_factor_rf`` x k
   candidates restores the recall the coarse codes lose.
3. ``HNSW32`` while its vectors plus graph fit the budget (``count <= HNSW_MAX``; beyond that the
   graph takes hours to build on one machine): the best speed/recall trade-off when memory allows.
4. ``IVF<nlist>,Flat`` while full vectors fit: nlist ~ 4 sqrt(count) (a power of two), each list
   gets >= 39 training points; quantizer ``IVF<nlist>_HNSW32`` once nlist >= 65536 (the coarse
   search then costs as much as the list scan).
5. ``OPQ<m>,IVF<nlist>,PQ<m>``: m bytes per vector, the largest m (dividing dim) that fits.

No torch, no faiss import here: the choice is a pure function, testable without building anything.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass

EXACT_MAX = 50_000
HNSW_MAX = 10_000_000
HNSW_M = 32
MIN_POINTS_PER_LIST = 39  # faiss k-means warns below this many training points per centroid
TRAIN_POINTS_PER_LIST = 64
PQ_TRAIN_MIN = 65_536  # 256 PQ centroids per sub-quantizer want >= 39 * 256 points; OPQ wants more
ID_BYTES = 8
PQ_BYTES = (64, 48, 32, 24, 16, 12, 8, 4, 2, 1)  # code sizes GPU IVFPQ supports (with float16 tables above 48)
DEFAULT_MEMORY_FRACTION = 0.5
BATCH_MIN = 64  # queries per call from which a batch's throughput, not one query's latency, decides
BATCH_LIST_DIVISOR = 4  # batched fast-scan uses nlist_for(count) / 4 lists: longer lists, less per-list overhead
PROJECTION_DIVISOR = 4  # ... on a projection to dim / 4 dimensions (at least MIN_PROJECTION), one 4-bit code each
MIN_PROJECTION = 16

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


@dataclass(frozen=True)
class IndexChoice:
    """The chosen factory string and what it is expected to cost."""

    factory: str
    family: str  # "flat" | "hnsw" | "ivf" | "ivfpq"
    reason: str
    estimated_bytes: int
    train_size: int  # vectors to train on (0: no training)
    nlist: int = 0
    pq_bytes: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def parse_memory(text: str | int | float) -> int:
    """``"512M"``, ``"8G"``, ``"1.5T"``, ``"1000000"`` (bytes) -> bytes."""
    if isinstance(text, (int, float)):
        value = int(text)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgtKMGT]?)(i?[bB])?\s*", str(text))
        if not match:
            raise ValueError(f"cannot read memory size {text!r}; use e.g. 512M, 8G, 1.5T or a number of bytes")
        value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise ValueError(f"memory size must be positive, got {text!r}")
    return value


def default_max_memory() -> int:
    """Half the machine's physical memory (the rest is for the metadata, queries and the OS)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return int(total * DEFAULT_MEMORY_FRACTION)


def format_bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{value:.1f} TiB"


def nlist_for(count: int) -> int:
    """Inverted lists for ``count`` vectors: the power of two nearest 4 sqrt(count), with at least
    ``MIN_POINTS_PER_LIST`` vectors per list (so k-means has enough points)."""
    if count < 1:
        raise ValueError(f"count must be positive, got {count}")
    target = 4 * math.sqrt(count)
    nlist = 2 ** max(0, round(math.log2(target)))
    while nlist > 1 and count < MIN_POINTS_PER_LIST * nlist:
        nlist //= 2
    return nlist


def quantizer_for(nlist: int) -> str:
    """``IVF<nlist>`` with a flat coarse quantizer, or an HNSW one for very many lists."""
    return f"IVF{nlist}_HNSW32" if nlist >= 65536 else f"IVF{nlist}"


def projection_dim(dim: int) -> int:
    """Dimensions of the projection ahead of batched fast-scan PQ: dim / 4 (even), at least 16 unless dim is
    smaller. Learned embeddings put most of their variance in a few dozen directions, so the 4-bit codes
    are spent where the distances are; the exact re-ranking then corrects what the projection drops."""
    return max(2, min(dim - dim % 2, max(MIN_PROJECTION, (dim // PROJECTION_DIVISOR) // 2 * 2)))


def batched_factory(count: int, dim: int) -> tuple[str, int, int]:
    """``(factory, nlist, projection dims)`` of the index for many queries per call:
    ``PCA<p>,IVF<n>,PQ<p>x4fs,RFlat``, fast-scan PQ (one 4-bit code per projected dimension) over a projection
    to p = ``projection_dim(dim)`` dimensions, with exact re-ranking of ``k_factor_rf`` x k candidates on the
    full vectors. ``index.build`` trains the projection to keep inner products (``uncentre_projections``)."""
    nlist = max(1, nlist_for(count) // BATCH_LIST_DIVISOR)
    projected = projection_dim(dim)
    return f"PCA{projected},{quantizer_for(nlist)},PQ{projected}x4fs,RFlat", nlist, projected


def estimate_bytes(family: str, count: int, dim: int, nlist: int = 0, pq_bytes: int = 0) -> int:
    """Resident size of a built index (vectors or codes, ids, graph links, centroids, rotations);
    ``ivfpq-refine``: ``pq_bytes`` x 8 bits of fast-scan codes over projected dims, plus the full vectors."""
    if family == "ivfpq-refine":
        projected = 2 * pq_bytes
        return count * (4 * dim + ID_BYTES + pq_bytes) + nlist * 4 * projected + 4 * dim * projected
    if family == "flat":
        return count * (4 * dim + ID_BYTES)
    if family == "hnsw":
        # level 0 holds 2M links of 4 bytes; upper levels add about 1/M of that again
        return int(count * (4 * dim + ID_BYTES + 2 * HNSW_M * 4 * 1.1))
    centroids = nlist * 4 * dim * (2 if nlist >= 65536 else 1)  # the HNSW quantizer roughly doubles them
    if family == "ivf":
        return count * (4 * dim + ID_BYTES) + centroids
    if family == "ivfpq":
        return count * (pq_bytes + ID_BYTES) + centroids + 4 * dim * dim + 256 * 4 * dim
    raise ValueError(f"unknown index family {family!r}")


def train_size_for(family: str, count: int, nlist: int = 0) -> int:
    """How many vectors to train on: ``TRAIN_POINTS_PER_LIST`` per list, more for PQ codebooks."""
    if family in ("flat", "hnsw"):
        return 0
    wanted = max(TRAIN_POINTS_PER_LIST * nlist, PQ_TRAIN_MIN if family == "ivfpq" else 0)
    return int(min(count, wanted))


def choose_index(count: int, dim: int, max_memory: int | None = None, query_batch: int = 1) -> IndexChoice:
    """The index a careful engineer would build for ``count`` vectors of ``dim`` within ``max_memory`` bytes,
    searched ``query_batch`` queries per call (1: the app; see the module doc for why it matters).

    Raises ``ValueError`` for an empty collection, a batch size below 1, or when even the smallest PQ code
    does not fit.
    """
    if count < 1:
        raise ValueError("empty collection: there is nothing to index")
    if dim < 1:
        raise ValueError(f"dim must be positive, got {dim}")
    if query_batch < 1:
        raise ValueError(f"query batch must be at least 1 query per call, got {query_batch}")
    budget = default_max_memory() if max_memory is None else int(max_memory)
    size = format_bytes

    flat = estimate_bytes("flat", count, dim)
    if count <= EXACT_MAX and flat <= budget:
        return IndexChoice("Flat", "flat", f"{count} vectors <= {EXACT_MAX}: exact search is cheap ({size(flat)})", flat, 0)
    if query_batch >= BATCH_MIN:
        factory, nlist, projected = batched_factory(count, dim)
        needed = estimate_bytes("ivfpq-refine", count, dim, nlist, projected // 2)
        if needed <= budget:
            return IndexChoice(factory, "ivfpq",
                               f"{query_batch} queries per call: fast-scan PQ over a {projected}-d projection with "
                               f"exact re-ranking beats HNSW on batches; codes + full vectors ({size(needed)}) fit in "
                               f"{size(budget)}", needed, train_size_for("ivfpq", count, nlist), nlist, projected // 2)
    hnsw = estimate_bytes("hnsw", count, dim)
    if count <= HNSW_MAX and hnsw <= budget:
        return IndexChoice(f"HNSW{HNSW_M}", "hnsw",
                           f"vectors + HNSW graph ({size(hnsw)}) fit in {size(budget)}", hnsw, 0)
    nlist = nlist_for(count)
    ivf = estimate_bytes("ivf", count, dim, nlist)
    why_not_hnsw = "more than 10M vectors (HNSW build too slow)" if count > HNSW_MAX else f"HNSW needs {size(hnsw)}"
    if ivf <= budget:
        return IndexChoice(f"{quantizer_for(nlist)},Flat", "ivf",
                           f"{why_not_hnsw}; full vectors in {nlist} lists ({size(ivf)}) fit in {size(budget)}",
                           ivf, train_size_for("ivf", count, nlist), nlist)
    for pq_bytes in PQ_BYTES:
        if pq_bytes > dim or dim % pq_bytes:
            continue
        needed = estimate_bytes("ivfpq", count, dim, nlist, pq_bytes)
        if needed <= budget:
            return IndexChoice(
                f"OPQ{pq_bytes},{quantizer_for(nlist)},PQ{pq_bytes}", "ivfpq",
                f"full vectors need {size(ivf)} > {size(budget)}; {pq_bytes}-byte OPQ codes ({size(needed)}) fit",
                needed, train_size_for("ivfpq", count, nlist), nlist, pq_bytes)
    smallest = estimate_bytes("ivfpq", count, dim, nlist, 1)
    raise ValueError(
        f"{count} vectors of dim {dim} do not fit in --max-memory {size(budget)} even as 1-byte PQ codes "
        f"(needs {size(smallest)}); raise --max-memory, or build parts and merge them on disk (index.merge --on-disk)"
    )


def describe_factory(factory: str) -> str:
    """The family of a user-given factory string (for search parameters and GPU support)."""
    upper = factory.upper()
    if "HNSW" in upper and "IVF" not in upper:
        return "hnsw"
    if "IVF" in upper:
        return "ivfpq" if re.search(r"PQ\d", upper) else "ivf"
    return "flat" if upper.strip() in ("FLAT", "IDMAP,FLAT", "IDMAP2,FLAT") else "other"
