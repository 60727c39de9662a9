"""App latency benchmark (``bench_app_latency.py``) as an on-demand test: ``make benchmark`` (never in the default run).

Environment: BENCH_APP_QUERIES (queries per kind, 100), BENCH_APP_WORKDIR (cache of the trained model, ONNX
export and 60,000-image index; default ``$TMPDIR/manyview-bench-app``), BENCH_OUTPUT (write the Markdown
report there). The committed figures: ``tests/benchmarks/RESULTS_app.md``.
"""
from __future__ import annotations

import importlib.util
import os

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("bench_app_latency", os.path.join(HERE, "bench_app_latency.py"))
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)

test_app_latency = _module.test_app_latency
