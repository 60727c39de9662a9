"""Fast-scan settings on the hard 1M x 128 mixture at 1,000 queries per call: faiss's scan implementations
(``implem`` 0, 10, 12-15) and nearby factories, against exact search (``faiss.IndexFlatIP``, BLAS) on the same
queries. An exploration for issue 20's batched-ANN target; prints one line per setting.

    flock /tmp/manyview-bench.lock python tests/benchmarks/explore_fastscan.py implem 'PCA32,IVF1024,PQ32x4fs,RFlat'
    flock /tmp/manyview-bench.lock python tests/benchmarks/explore_fastscan.py factories \\
        'PCA32,IVF1024,PQ16x4fs,RFlat;PCA32,IVF2048,PQ32x4fs,RFlat;PCA24,IVF1024,PQ24x4fs,RFlat'

    flock /tmp/manyview-bench.lock python tests/benchmarks/explore_fastscan.py coverage 'IVF1024,Flat;IVF4096,Flat'
    flock /tmp/manyview-bench.lock python tests/benchmarks/explore_fastscan.py spill 1024
    flock /tmp/manyview-bench.lock python tests/benchmarks/explore_fastscan.py stages \\
        'PCA32,IVF1024,PQ32x4fs,RFlat;PCA32,IVF4096,PQ32x4fs,RFlat'

``coverage`` (with ``IVF<n>,Flat`` factories) gives the recall of the cells alone, every probed vector ranked
exactly, at 2-8% of the vectors probed: no code can do better at that share; ``spill`` the same with each vector
also stored in a second cell (``spill_coverage``). ``factories`` sweeps nprobe (3-12%
of the lists) for each ``k_factor_rf`` in 4-64 and reports the fastest setting that reaches recall@10 0.95
(medians of 2 timed calls of all 1,000 queries). ``stages`` times the parts of one search call at the nprobe /
``k_factor_rf`` that reach recall 0.95 (``STAGE_SETTINGS``): the projection, the coarse assignment (faiss's
quantizer search: a small GEMM, then choosing nprobe of nlist lists per query), the fast-scan of the chosen lists
for ``k_factor_rf`` x 10 candidates (the inverted file's own search less the assignment), and the exact re-ranking
(the rest of the whole call), each against the 1/50 of exact search's time that the 50x target leaves for all.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
for path in (ROOT, ROOT / "tests", ROOT / "tests" / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def timed(fn, repeats: int = 3):
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - started)
    return float(np.median(seconds)), out


# nlist -> settings that reach recall@10 0.95 on these queries (the factories sweep's, and bench_index.py's tuning)
STAGE_SETTINGS = {1024: {"nprobe": 92, "k_factor_rf": 8}, 2048: {"nprobe": 153, "k_factor_rf": 8},
                  4096: {"nprobe": 245, "k_factor_rf": 8}}


def stages(index, ivf, queries: np.ndarray, truth: np.ndarray, exact, params: dict, factory: str,
           repeats: int = 7) -> None:
    """Time each part of one 1,000-query call, interleaved with exact search, and print medians in ms."""
    import faiss

    from bench_index import recall10
    from index import devices

    devices.set_search_params(index, params)
    transform = faiss.downcast_index(faiss.downcast_index(faiss.downcast_index(index).index).base_index)
    projection = faiss.downcast_VectorTransform(transform.chain.at(0))
    projected = projection.apply(queries)
    quantizer = faiss.downcast_index(ivf.quantizer)
    nprobe, candidates = int(params["nprobe"]), int(params["k_factor_rf"]) * 10
    centroids = quantizer.reconstruct_n(0, ivf.nlist)
    parts = {"whole call": lambda: index.search(queries, 10),
             # the IVF's own search: assignment + scan (search_preassigned takes a slower per-query path)
             "inverted file search": lambda: ivf.search(projected, candidates),
             "coarse assignment": lambda: quantizer.search(projected, nprobe),
             "  of which the GEMM": lambda: projected @ centroids.T,
             "projection": lambda: projection.apply(queries),
             "exact": lambda: exact.search(queries, 10)}
    seconds: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(repeats):  # interleaved, so drift hits every part alike
        for name, fn in parts.items():
            started = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - started)
    ms = {name: 1000 * float(np.median(values)) for name, values in seconds.items()}
    ms["fast-scan (the difference)"] = ms.pop("inverted file search") - ms["coarse assignment"]
    ms["re-ranking (the rest)"] = ms["whole call"] - ms["projection"] - ms["coarse assignment"] \
        - ms["fast-scan (the difference)"]
    budget = ms["exact"] / 50
    _, found = index.search(queries, 10)
    codes = len(queries) * ivf.ntotal * nprobe / ivf.nlist  # lists are near equal in size
    per_code = 1e6 * ms["fast-scan (the difference)"] * faiss.omp_get_max_threads() / codes
    print(f"{factory} {params}: recall {recall10(found, truth):.4f}, {ms['exact'] / ms['whole call']:.1f}x exact; "
          f"the 50x budget is {budget:.1f} ms; fast-scan {per_code:.2f} ns per code per thread", flush=True)
    for name in ("whole call", "projection", "coarse assignment", "  of which the GEMM", "fast-scan (the difference)",
                 "re-ranking (the rest)"):
        print(f"  {name:<26} {ms[name]:7.1f} ms  ({ms[name] / budget:.2f} x the 50x budget)", flush=True)


def spill_coverage(base: np.ndarray, queries: np.ndarray, truth: np.ndarray, nlist: int, soar_weight: float = 1.0,
                   candidates: int = 8) -> None:
    """Recall of ``IVF<nlist>,Flat`` cells alone when every vector is also stored in a second cell, against the
    share of the (now doubled) stored vectors scanned. The second cell is the next nearest centroid, or the one of
    the ``candidates`` nearest that minimises SOAR's loss ||r'||^2 + w <r, r'>^2 / ||r||^2 (Sun et al. 2023,
    r and r' the residuals to the first and the second centroid). Results are deduplicated before recall."""
    import faiss

    from bench_index import recall10

    quantizer = faiss.IndexFlatIP(base.shape[1])
    ivf = faiss.IndexIVFFlat(quantizer, base.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.train(base[:160_000])
    centroids = quantizer.reconstruct_n(0, nlist)
    _, nearest = quantizer.search(base, candidates)
    residual = base - centroids[nearest[:, 0]]
    soar = np.empty(len(base), dtype=np.int64)
    for start in range(0, len(base), 100_000):  # blocks: [block, candidates - 1, d] residuals
        rows = slice(start, start + 100_000)
        others = nearest[rows, 1:]
        second = base[rows, None, :] - centroids[others]
        first = residual[rows, None, :]
        loss = (second * second).sum(2) + soar_weight * (second * first).sum(2) ** 2 / (first * first).sum(2)
        soar[rows] = others[np.arange(len(others)), loss.argmin(1)]
    ids = np.arange(len(base), dtype=np.int64)
    for name, second_cells in (("one cell", None), ("+ next nearest", nearest[:, 1]), ("+ SOAR's choice", soar)):
        ivf.reset()
        for cells in [nearest[:, 0]] + ([] if second_cells is None else [second_cells]):
            order = np.argsort(cells, kind="stable")
            bounds = np.searchsorted(cells[order], np.arange(nlist + 1))
            for cell in range(nlist):
                rows = order[bounds[cell]:bounds[cell + 1]]
                if len(rows):
                    vectors, cell_ids = np.ascontiguousarray(base[rows]), np.ascontiguousarray(ids[rows])
                    ivf.invlists.add_entries(cell, len(rows), faiss.swig_ptr(cell_ids),
                                             faiss.swig_ptr(vectors.view(np.uint8)))
            ivf.ntotal += len(base)
        for nprobe in (10, 20, 30, 40, 61, 81):
            ivf.nprobe = nprobe
            _, found = ivf.search(queries, 40)
            unique = np.array([(list(dict.fromkeys(row[row >= 0])) + [-1] * 10)[:10] for row in found])
            print(f"IVF{nlist},Flat {name}: nprobe {nprobe}, {nprobe / nlist * ivf.ntotal / len(base):.1%} of the "
                  f"vectors scanned: recall {recall10(unique, truth):.4f}", flush=True)


MODES = ("implem", "factories", "coverage", "stages", "spill")


def main(argv: list[str]) -> int:
    import faiss

    from bench_index import hard_mixture, recall10
    from index import devices
    from index.build import build_arrays

    if len(argv) != 2 or argv[0] not in MODES:
        print(f"usage: explore_fastscan.py {{{'|'.join(MODES)}}} 'FACTORY;...' (spill: 'NLIST;...')", file=sys.stderr)
        return 2
    mode, factories = argv[0], argv[1].split(";")
    base, queries = hard_mixture(1_000_000), hard_mixture(1000, draw_seed=2)
    exact = faiss.IndexFlatIP(base.shape[1])
    exact.add(base)
    exact_seconds, (_, truth) = timed(lambda: exact.search(queries, 10), 2)
    print(f"exact: {exact_seconds:.3f} s for 1,000 queries", flush=True)
    if mode == "spill":
        for nlist in factories:
            spill_coverage(base, queries, truth, int(nlist))
        return 0
    for factory in factories:
        _, index = build_arrays(base, None, ids=np.arange(len(base)), factory=factory, tune_queries=0,
                                train_size=160_000)
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        if mode == "coverage":  # IVF<n>,Flat: every probed vector ranked exactly, so recall is the cells' ceiling
            for share in (0.02, 0.03, 0.04, 0.05, 0.06, 0.08):
                nprobe = max(1, int(share * ivf.nlist))
                devices.set_search_params(index, {"nprobe": nprobe})
                _, found = index.search(queries, 10)
                print(f"{factory} nprobe {nprobe} ({share:.0%} of the vectors): "
                      f"recall {recall10(found, truth):.4f}", flush=True)
            continue
        if mode == "stages":
            stages(index, ivf, queries, truth, exact, STAGE_SETTINGS[ivf.nlist], factory)
            continue
        if mode == "implem":
            for params in ({"nprobe": 64, "k_factor_rf": 8}, {"nprobe": 88, "k_factor_rf": 8},
                           {"nprobe": 128, "k_factor_rf": 8}, {"nprobe": 64, "k_factor_rf": 16}):
                devices.set_search_params(index, params)
                for implem in (0, 10, 12, 13, 14, 15):
                    ivf.implem = implem
                    seconds, (_, found) = timed(lambda: index.search(queries, 10))
                    print(f"{factory} {params} implem {implem}: recall {recall10(found, truth):.4f}, "
                          f"{exact_seconds / seconds:.1f}x exact", flush=True)
            continue
        best = None
        for k_factor in (4, 8, 16, 32, 64):
            for share in (0.03, 0.045, 0.06, 0.075, 0.09, 0.12):
                params = {"nprobe": max(1, int(share * ivf.nlist)), "k_factor_rf": k_factor}
                devices.set_search_params(index, params)
                seconds, (_, found) = timed(lambda: index.search(queries, 10), 2)
                recall = recall10(found, truth)
                if recall >= 0.95:
                    if best is None or exact_seconds / seconds > best[0]:
                        best = (exact_seconds / seconds, params, recall)
                    break
        print(f"{factory}: fastest at recall >= 0.95: "
              + (f"{best[0]:.1f}x exact, {best[1]}, recall {best[2]:.4f}" if best else "none"), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
