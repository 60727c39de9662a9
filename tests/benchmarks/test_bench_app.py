"""App latency benchmarks (``bench_app_latency.py``, ``bench_api_load.py``) as on-demand tests: ``make benchmark``
(never in the default run).

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

_load_spec = importlib.util.spec_from_file_location("bench_api_load", os.path.join(HERE, "bench_api_load.py"))
_load_module = importlib.util.module_from_spec(_load_spec)
_load_spec.loader.exec_module(_load_module)

test_api_load = _load_module.test_api_load  # BENCH_API_SECONDS (60 per client kind and concurrency)


def test_answers_are_checked_label_and_score():
    """The benchmark's correctness check (``check_answers``) fails on a wrong, short or unstable answer."""
    expected = {("text", "a photo of a ship."): ["ship · score 0.873", "ship · score 0.861", "truck · score 0.850"]}
    right = [["ship · score 0.873", "ship · score 0.861", "truck · score 0.850"],
             ["ship · score 0.874", "ship · score 0.860", "truck · score 0.851"]]  # another thread count's rounding
    assert _module.check_answers({("text", "a photo of a ship."): right}, expected) == []
    tied = {("text", "a photo of a ship."): ["ship · score 0.873", "truck · score 0.861", "ship · score 0.860"]}
    assert _module.check_answers({("text", "a photo of a ship."): [tied[("text", "a photo of a ship.")]]},
                                 {("text", "a photo of a ship."): ["ship · score 0.873", "ship · score 0.861",
                                                                   "truck · score 0.860"]}) == []  # a tie swapped
    wrong_label = [["ship · score 0.873", "cat · score 0.861", "truck · score 0.850"]]
    wrong_score = [["ship · score 0.873", "ship · score 0.861", "truck · score 0.800"]]
    short = [["ship · score 0.873", "ship · score 0.861"]]
    for answers in (wrong_label, wrong_score, short):
        assert len(_module.check_answers({("text", "a photo of a ship."): answers}, expected)) == 1
    assert _module.check_answers({("image", "q.png"): right}, expected) == ["('image', 'q.png'): no expected answer"]
    assert _module.gallery_captions([{"image": {"path": "x"}, "caption": "ship · score 0.873"},
                                     ["y", "cat · score 0.5"]]) == ["ship · score 0.873", "cat · score 0.5"]
    # The search API's structured results read as the same captions (label, else caption, else #id).
    results = [{"id": 3, "label": "ship", "caption": None, "score": 0.87312},
               {"id": 4, "label": None, "caption": "a red car", "score": -0.5}, {"id": 5, "label": None, "score": 0.1}]
    assert _module.result_captions(results) == ["ship · score 0.873", "a red car · score -0.500", "#5 · score 0.100"]


def test_load_benchmark_prompts_are_distinct():
    """bench_api_load.py cycles through 1,000 different prompts (no answer cache could make it look fast)."""
    assert len(set(_load_module.prompts())) == len(_load_module.prompts()) == 1000
