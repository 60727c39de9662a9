"""distill against training from scratch, on demand (``-m benchmark``): a cnn-small student distilled for 200 steps
from a trained teacher beats the same cnn-small trained from scratch with simclr for the same 200 steps, and its own
random-init floor, on kNN top-1 (real CIFAR-10, 2,000 train images as the bank, 1,000 test queries).

The teacher: cnn-small trained with ``supcon`` (labels) for 600 steps, exported to ONNX and run by onnxruntime
(``--set teacher=DIR``). Students: ``distill`` with its recipe (mixup on, as LightlyTrain) and with ``mixup=false``;
``simclr`` with its recipe; all with the optimizer of the other learning checks (AdamW, lr 4e-3 per 256, batch 64).
Measured at --seed 0 on 2 cores (AMD EPYC), ``pytest -m benchmark tests/benchmarks/test_distill_learning.py -s``
(1 passed; 1253 s on 2 cores shared with other jobs, about 8 minutes alone):
- teacher (supcon, 600 steps): kNN 0.473;
- distill, 200 steps, recipe (mixup on): 0.410; with ``mixup=false``: 0.438;
- simclr from scratch, 200 steps: 0.384;
- floor (the same cnn-small, ``--max-steps 0``): 0.285.
Distilled beats scratch by +2.6 points (+5.4 without mixup, which pays off only over LightlyTrain's long schedules)
and its floor by +12.5.
"""
import json

import pytest

from conftest import CIFAR_DIR, CIFAR_SKIP_REASON
from learning_helpers import knn_after

pytestmark = [pytest.mark.benchmark, pytest.mark.skipif(not CIFAR_DIR.exists(), reason=CIFAR_SKIP_REASON)]

ADAMW = ["--optimizer", "adamw", "--lr", "4e-3", "--weight-decay", "1e-4", "--warmup-steps", "20"]
TEACHER_STEPS, STEPS = 600, 200


def test_distilled_student_beats_a_student_trained_from_scratch(cifar_2k_shards, tmp_path):
    from export.onnx import export_model

    shards = cifar_2k_shards
    teacher = knn_after(shards, tmp_path / "teacher", TEACHER_STEPS, ["--objective", "supcon", *ADAMW])
    export_model(str(tmp_path / "teacher" / "model"), str(tmp_path / "teacher_onnx"))
    distill = ["--objective", "distill", *ADAMW, "--set", f"teacher={tmp_path / 'teacher_onnx'}"]
    results = {
        "teacher_supcon": teacher,
        "floor": knn_after(shards, tmp_path / "floor", 0, distill),
        "distill": knn_after(shards, tmp_path / "distill", STEPS, distill),
        "distill_no_mixup": knn_after(shards, tmp_path / "distill_no_mixup", STEPS, [*distill, "--set", "mixup=false"]),
        "simclr_scratch": knn_after(shards, tmp_path / "simclr", STEPS, ["--objective", "simclr", *ADAMW]),
    }
    print(json.dumps({"teacher_steps": TEACHER_STEPS, "steps": STEPS, **results}))
    assert results["distill"] >= results["simclr_scratch"] + 0.01, results
    assert results["distill"] >= results["floor"] + 0.05, results
    assert results["distill_no_mixup"] >= results["simclr_scratch"] + 0.01, results
