"""index.select: which index a collection of a given size, dimension and memory budget gets."""
from __future__ import annotations

import pytest

from index.select import (
    BATCH_MIN,
    EXACT_MAX,
    choose_index,
    describe_factory,
    estimate_bytes,
    nlist_for,
    parse_memory,
    projection_dim,
    train_size_for,
)

GiB, MiB = 1 << 30, 1 << 20


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """faiss's OpenMP threads spin when the shared 2-core machine is oversubscribed (PQ training on 2,000
    vectors took 44 s instead of 1); the indexes here are tiny, so one thread is faster and steadier."""
    faiss = pytest.importorskip("faiss")
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def test_parse_memory() -> None:
    assert parse_memory("8G") == 8 * GiB
    assert parse_memory("512M") == 512 * MiB
    assert parse_memory("512MiB") == 512 * MiB
    assert parse_memory("1.5T") == int(1.5 * (1 << 40))
    assert parse_memory("1000") == 1000 and parse_memory(4096) == 4096
    for bad in ("lots", "8Q", "0", "-1G"):
        with pytest.raises(ValueError, match="memory"):
            parse_memory(bad)


def test_nlist_is_four_sqrt_n_with_enough_points_per_list() -> None:
    assert nlist_for(1_000_000) == 4096  # 4 * 1000, nearest power of two
    assert nlist_for(60_000) == 1024  # 4 * 245 = 980
    assert nlist_for(1_000_000_000) == 131072  # 4 * 31623 = 126491
    # 1000 vectors: 4 sqrt(n) = 126 -> 128, but 128 lists would get < 39 points each -> 16 (62 each)
    assert nlist_for(1000) == 16
    assert nlist_for(1) == 1
    with pytest.raises(ValueError):
        nlist_for(0)


def test_small_collections_are_exact() -> None:
    choice = choose_index(60_000 - 10_001, 512, max_memory=GiB)
    assert choice.factory == "Flat" and choice.family == "flat" and choice.train_size == 0
    assert choose_index(EXACT_MAX, 128, GiB).factory == "Flat"
    assert choose_index(EXACT_MAX + 1, 128, GiB).factory == "HNSW32"


def test_one_million_vectors_by_memory_budget() -> None:
    """1M x 128: vectors are 512 MB; the graph adds ~280 MB; PQ codes shrink each vector to m bytes."""
    count, dim = 1_000_000, 128
    hnsw = choose_index(count, dim, 8 * GiB)
    assert hnsw.factory == "HNSW32" and hnsw.estimated_bytes == estimate_bytes("hnsw", count, dim)
    ivf = choose_index(count, dim, 600 * MiB)  # 520 MB of vectors + ids fit, the graph does not
    assert ivf.factory == "IVF4096,Flat" and ivf.nlist == 4096 and ivf.train_size == 64 * 4096
    assert "HNSW needs" in ivf.reason
    pq = choose_index(count, dim, 200 * MiB)  # 64-byte codes + 8-byte ids = 72 MB
    assert pq.factory == "OPQ64,IVF4096,PQ64" and pq.pq_bytes == 64 and pq.train_size == 262_144
    tight = choose_index(count, dim, 20 * MiB)  # (8 + 8) bytes per vector = 16 MB
    assert tight.factory == "OPQ8,IVF4096,PQ8"
    with pytest.raises(ValueError, match=r"do not fit in --max-memory .*raise --max-memory"):
        choose_index(count, dim, 5 * MiB)


def test_beyond_hnsw_and_billions() -> None:
    assert choose_index(20_000_000, 128, 64 * GiB).factory == "IVF16384,Flat"  # too many for an HNSW build
    billion = choose_index(1_000_000_000, 128, 128 * GiB)
    assert billion.factory == "OPQ64,IVF131072_HNSW32,PQ64"  # HNSW coarse quantizer for 131072 lists
    assert billion.estimated_bytes <= 128 * GiB


def test_pq_bytes_divide_the_dimension() -> None:
    choice = choose_index(1_000_000, 96, 100 * MiB)
    assert choice.factory == "OPQ48,IVF4096,PQ48" and 96 % choice.pq_bytes == 0


def test_training_sizes() -> None:
    assert train_size_for("flat", 10**6) == 0 and train_size_for("hnsw", 10**6) == 0
    assert train_size_for("ivf", 10**6, 4096) == 262_144
    assert train_size_for("ivfpq", 100_000, 256) == 65_536  # PQ codebooks want more than 64 per list
    assert train_size_for("ivf", 5_000, 4096) == 5_000  # never more than the collection


def test_every_choice_is_a_valid_factory() -> None:
    faiss = pytest.importorskip("faiss")
    for count, memory in ((10_000, GiB), (100_000, GiB), (10**6, 600 * MiB), (10**6, 20 * MiB), (10**9, 128 * GiB)):
        choice = choose_index(count, 128, memory)
        index = faiss.index_factory(128, choice.factory, faiss.METRIC_INNER_PRODUCT)
        assert index.d == 128 and describe_factory(choice.factory) == choice.family


def test_errors() -> None:
    with pytest.raises(ValueError, match="empty collection"):
        choose_index(0, 128, GiB)
    with pytest.raises(ValueError, match="dim"):
        choose_index(10, 0, GiB)


def test_refined_ivf_pq_keeps_sample_ids():
    """``IVF..,PQ..,RFlat`` (IVF-PQ with exact re-ranking) cannot take ids itself: it is wrapped, so search
    returns sample ids."""
    import numpy as np

    from index.build import new_index

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((2000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(2000, dtype=np.int64) * 7 + 1000
    index = new_index(16, "IVF16,PQ4x4fs,RFlat")  # 4-bit fast-scan: trains in 0.2 s (8-bit PQ4: 7-17 s in CI)
    index.train(vectors)
    index.add_with_ids(vectors, ids)
    _, found = index.search(vectors[:5], 1)
    assert found[:, 0].tolist() == ids[:5].tolist()


def test_nprobe_widens_an_hnsw_coarse_quantizer():
    import faiss
    import numpy as np

    from index.devices import set_search_params

    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((3000, 8)).astype(np.float32)
    index = faiss.index_factory(8, "IVF64_HNSW8,Flat")
    index.train(vectors)
    set_search_params(index, {"nprobe": 48})
    quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    assert faiss.extract_index_ivf(index).nprobe == 48 and quantizer.hnsw.efSearch >= 48


def test_batches_choose_fast_scan_with_re_ranking() -> None:
    """Many queries per call: fast-scan IVF-PQ over a dim/4 projection with exact re-ranking (HNSW's graph walk
    does not batch; see RESULTS_index.md); one query per call keeps HNSW. Small collections stay exact."""
    count, dim = 1_000_000, 128
    assert choose_index(count, dim, 8 * GiB).factory == "HNSW32"
    assert choose_index(count, dim, 8 * GiB, query_batch=BATCH_MIN - 1).factory == "HNSW32"
    batched = choose_index(count, dim, 8 * GiB, query_batch=1000)
    assert batched.factory == "PCA32,IVF1024,PQ32x4fs,RFlat" and batched.family == "ivfpq"
    assert batched.nlist == 1024 and batched.pq_bytes == 16 and "1000 queries per call" in batched.reason
    # full vectors (for re-ranking) + ids + 16-byte codes + centroids + projection
    assert batched.estimated_bytes == count * (512 + 8 + 16) + 1024 * 4 * 32 + 4 * 128 * 32
    assert describe_factory(batched.factory) == "ivfpq"
    assert choose_index(60_000, 256, GiB, query_batch=1000).factory == "PCA64,IVF256,PQ64x4fs,RFlat"
    assert choose_index(EXACT_MAX, 128, GiB, query_batch=1000).factory == "Flat"
    # when the full vectors do not fit, batches fall back to the compressed choices
    assert choose_index(count, dim, 200 * MiB, query_batch=1000).factory == "OPQ64,IVF4096,PQ64"
    assert projection_dim(128) == 32 and projection_dim(512) == 128
    assert projection_dim(40) == 16 and projection_dim(9) == 8
    with pytest.raises(ValueError, match="query batch must be at least 1"):
        choose_index(count, dim, GiB, query_batch=0)


def test_batched_choice_is_a_valid_factory() -> None:
    faiss = pytest.importorskip("faiss")
    for count, dim in ((10**6, 128), (60_000, 256), (100_000, 96)):
        choice = choose_index(count, dim, 64 * GiB, query_batch=256)
        index = faiss.index_factory(dim, choice.factory, faiss.METRIC_INNER_PRODUCT)  # owns the C++ object
        assert isinstance(faiss.downcast_index(index), faiss.IndexRefineFlat)
        assert faiss.extract_index_ivf(index).nlist == choice.nlist
