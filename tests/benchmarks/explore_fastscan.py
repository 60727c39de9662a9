"""Fast-scan settings on the hard 1M x 128 mixture at 1,000 queries per call: faiss's scan implementations
(``implem`` 0, 10, 12-15) and nearby factories, against exact search (``faiss.IndexFlatIP``, BLAS) on the same
queries. An exploration for issue 20's batched-ANN target; prints one line per setting.

    flock /tmp/manyview-bench.lock python tests/benchmarks/explore_fastscan.py implem 'PCA32,IVF1024,PQ32x4fs,RFlat'
    flock /tmp/manyview-bench.lock python tests/benchmarks/explore_fastscan.py factories \\
        'PCA32,IVF1024,PQ16x4fs,RFlat;PCA32,IVF2048,PQ32x4fs,RFlat;PCA24,IVF1024,PQ24x4fs,RFlat'

``factories`` sweeps nprobe (3-12% of the lists) for each ``k_factor_rf`` in 4-64 and reports the fastest
setting that reaches recall@10 0.95 (medians of 2 timed calls of all 1,000 queries).
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


def main(argv: list[str]) -> int:
    import faiss

    from bench_index import hard_mixture, recall10
    from index import devices
    from index.build import build_arrays

    mode, factories = argv[0], argv[1].split(";")
    base, queries = hard_mixture(1_000_000), hard_mixture(1000, draw_seed=2)
    exact = faiss.IndexFlatIP(base.shape[1])
    exact.add(base)
    exact_seconds, (_, truth) = timed(lambda: exact.search(queries, 10), 2)
    print(f"exact: {exact_seconds:.3f} s for 1,000 queries", flush=True)
    for factory in factories:
        _, index = build_arrays(base, None, ids=np.arange(len(base)), factory=factory, tune_queries=0,
                                train_size=160_000)
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
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
