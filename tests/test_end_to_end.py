"""End to end on real CIFAR-10 shards: prepare -> pretrain -> evaluate -> export -> index -> search.

Also: a 2-process ``accelerate launch`` on unevenly split shards, and a run killed with SIGKILL that
resumes from its last complete checkpoint.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from onnx_fixtures import CIFAR_DIR, CIFAR_SKIP_REASON

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not CIFAR_DIR.exists(), reason=CIFAR_SKIP_REASON)]

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = str(REPO / "trainer" / "pretrain.py")
TINY_TEXT = "text={width: 64, heads: 2, layers: 1, context_length: 16}"


def _run(*argv, timeout=600, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    result = subprocess.run([*argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, argv))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """600 train samples in uneven shards (250, 250, 100) and 600 test samples, with dense ids."""
    from trainer.prepare import prepare

    out = tmp_path_factory.mktemp("cifar-small")
    prepare(f"{CIFAR_DIR}/train-000000.tar.gz::{CIFAR_DIR}/test-000000.tar.gz", str(out), shard_size=250, limit=600)
    return out


def test_simclr_train_resume_evaluate_export_index_search(shards, tmp_path):
    from export.runtime import Encoder
    from index.build import build_index
    from index.search import Index
    from trainer.evaluate import evaluate
    from trainer.pretrain import main as pretrain

    run = tmp_path / "simclr"
    common = ["--objective", "simclr", "--train-data", f"{shards}/train-{{000000..000002}}.tar.gz", "--output", str(run),
              "--backbone", "cnn-small", "--batch-size", "16", "--num-workers", "1", "--log-every", "1",
              "--checkpoint-every", "2", "--set", "projection_hidden_dim=64", "--set", "projection_dim=32"]
    assert pretrain([*common, "--max-steps", "3"]) == 0
    assert sorted(os.listdir(run / "checkpoints")) == ["step_00000002", "step_00000003"]
    assert pretrain([*common, "--max-steps", "5", "--resume"]) == 0
    steps = [m["step"] for m in _metrics(run)]
    assert steps == [1, 2, 3, 4, 5]  # the resumed run continued at step 4
    assert all(np.isfinite(m["loss"]) and m["images_per_s"] > 0 for m in _metrics(run))
    card = json.loads((run / "model" / "config.json").read_text())
    assert card["objective"] == "simclr" and card["steps"] == 5 and card["embed_dim"] == 256

    result = evaluate(str(run / "model"), f"{shards}/train-*.tar.gz", f"{shards}/test-*.tar.gz", linear=True, num_workers=1)
    assert 0.1 <= result["knn_top1"] <= 1.0 and 0.0 <= result["linear_top1"] <= 1.0
    assert result["train_samples"] == 600 and result["test_samples"] == 600

    out = _run(sys.executable, "-m", "export", "--model", str(run / "model"), "--output", str(run / "onnx"))
    assert "max abs diff" in out.stdout
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["parity"]["image"]["max_abs_diff"] <= 1e-4
    assert not (run / "onnx" / "text_encoder.onnx").exists()

    info = build_index(str(run / "onnx"), f"{shards}/test-*.tar.gz", str(run / "index"), progress=False)
    assert info["count"] == 600 and info["dim"] == 256 and info["factory"] == "Flat"
    index, encoder = Index.load(str(run / "index")), Encoder(str(run / "onnx"))
    some_id = int(index.ids[7])
    scores, ids = index.search(encoder.encode_images([index.image(some_id)]), 5)
    assert ids[0, 0] == some_id and scores[0, 0] == pytest.approx(1.0, abs=1e-4)


def test_clip_through_the_console_script(shards, tmp_path):
    run = tmp_path / "clip"
    manyview = [sys.executable, "-m", "app.cli"]
    _run(*manyview, "pretrain", "--objective", "clip", "--train-data", f"{shards}/train-*.tar.gz", "--output", str(run),
         "--backbone", "cnn-small", "--batch-size", "16", "--max-steps", "3", "--num-workers", "1", "--log-every", "1",
         "--set", TINY_TEXT)
    out = _run(*manyview, "evaluate", "--model", str(run / "model"), "--train-data", f"{shards}/train-000002.tar.gz",
               "--test-data", f"{shards}/test-000002.tar.gz", "--zero-shot", "--num-workers", "1")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0.0 <= result["zero_shot_top1"] <= 1.0 and "knn_top1" in result
    _run(*manyview, "export", "--model", str(run / "model"), "--output", str(run / "onnx"))
    preprocess = json.loads((run / "onnx" / "preprocess.json").read_text())
    assert preprocess["tokenizer"]["context_length"] == 16 and preprocess["parity"]["text"]["max_abs_diff"] <= 1e-4
    _run(*manyview, "index", "--encoder", str(run / "onnx"), "--data", f"{shards}/test-000002.tar.gz",
         "--output", str(run / "index"))

    from export.runtime import Encoder
    from index.search import Index

    encoder, index = Encoder(str(run / "onnx")), Index.load(str(run / "index"))
    scores, ids = index.search(encoder.encode_texts(["a photo of a ship."]), 7)
    assert ids.shape == (1, 7) and len(index.records(ids[0])) == 7 and np.all(np.diff(scores[0]) <= 1e-6)


def test_two_processes_with_uneven_shards_do_not_hang(shards, tmp_path):
    run = tmp_path / "ddp"
    _run(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no",
         PRETRAIN, "--objective", "simclr", "--train-data", f"{shards}/train-*.tar.gz", "--output", str(run),
         "--backbone", "cnn-small", "--batch-size", "8", "--max-steps", "3", "--num-workers", "1", "--log-every", "1",
         "--set", "projection_hidden_dim=64", timeout=300)
    config = json.loads((run / "train_config.json").read_text())
    assert config["world_size"] == 2
    assert [m["step"] for m in _metrics(run)] == [1, 2, 3]
    assert _metrics(run)[-1]["images_seen"] == 3 * 16
    assert (run / "model" / "model.safetensors").exists()


def test_killed_run_resumes_exactly_where_it_stopped(shards, tmp_path):
    """SIGKILL a real run after a checkpoint; the resumed run logs the same losses as an uninterrupted run
    from the checkpoint on (same data order, RNG states, optimizer and schedules), with no duplicate steps."""
    total = 12

    def argv(run: Path) -> list[str]:
        return [sys.executable, PRETRAIN, "--objective", "simclr", "--train-data", f"{shards}/train-*.tar.gz",
                "--output", str(run), "--backbone", "cnn-small", "--batch-size", "16", "--max-steps", str(total),
                "--num-workers", "1", "--log-every", "1", "--checkpoint-every", "2", "--set", "projection_hidden_dim=64"]

    reference = tmp_path / "reference"
    _run(*argv(reference))
    run = tmp_path / "killed"
    process = subprocess.Popen(argv(run), cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "2"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and not (run / "checkpoints" / "step_00000004" / "COMPLETE").exists():
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert (run / "checkpoints" / "step_00000004").exists(), "the run never wrote its second checkpoint"
    assert not (run / "model").exists()
    from trainer.checkpoint import complete_checkpoints

    resumed_from = complete_checkpoints(str(run))[-1][0]
    assert 4 <= resumed_from < total
    _run(*argv(run), "--resume")
    resumed, uninterrupted = _metrics(run), _metrics(reference)
    assert [m["step"] for m in resumed] == list(range(1, total + 1))  # rows logged after the checkpoint were dropped
    for mine, theirs in zip(resumed, uninterrupted):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-6, abs=1e-6), (mine["step"], mine["loss"], theirs["loss"])
        assert mine["lr"] == pytest.approx(theirs["lr"], rel=1e-9)
    card = json.loads((run / "model" / "config.json").read_text())
    assert card["steps"] == total
