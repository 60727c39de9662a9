"""Learning checks: train a few steps, measure kNN top-1 against the same command's random-init floor."""
import json
from pathlib import Path


LEARNING_THREADS = 2


def knn_after(shards: Path, run: Path, steps: int, args: list[str], batch_size: int = 64) -> float:
    """Train ``steps`` steps of cnn-small with ``args`` (must include --objective), return kNN top-1
    (bank: the 2,000 train images; queries: the first 1,000 test images). ``steps=0`` is the floor."""
    return scores_after(shards, run, steps, args, batch_size)["knn_top1"]


def scores_after(shards: Path, run: Path, steps: int, args: list[str], batch_size: int = 64,
                 linear: bool = False, zero_shot: bool = False) -> dict:
    """``knn_after``'s training, returning ``trainer.evaluate``'s scores: ``knn_top1``, ``linear_top1`` (a
    logistic-regression probe on the same bank) with ``linear``, ``zero_shot_top1`` (class-name prompts; image-text
    models) with ``zero_shot``."""
    import torch

    from trainer.evaluate import evaluate
    from trainer.pretrain import main as pretrain

    # Results depend on the thread count (reduction order), and libraries sharing torch's OpenMP runtime (faiss)
    # may have changed it: pin it so a check measures the same number wherever it runs in the suite.
    torch.set_num_threads(LEARNING_THREADS)
    assert pretrain(["--train-data", f"{shards}/train-*.tar.gz", "--output", str(run), "--backbone", "cnn-small",
                     "--batch-size", str(batch_size), "--max-steps", str(steps), "--log-every", "25",
                     "--checkpoint-every", "0", *args]) == 0
    return evaluate(str(run / "model"), f"{shards}/train-*.tar.gz", f"{shards}/test-000000.tar.gz", linear=linear,
                    zero_shot=zero_shot, num_workers=2)


def assert_beats_floor(shards: Path, tmp_path: Path, name: str, steps: int, args: list[str], margin: float,
                       metric: str = "knn_top1") -> None:
    """Train ``steps`` steps and assert ``metric`` (kNN top-1, or ``linear_top1``: the logistic-regression probe) >=
    the same command's ``--max-steps 0`` floor + ``margin``."""
    linear = metric == "linear_top1"
    floor = scores_after(shards, tmp_path / "floor", 0, args, linear=linear)[metric]
    trained = scores_after(shards, tmp_path / "trained", steps, args, linear=linear)[metric]
    print(json.dumps({"objective": name, "steps": steps, f"floor_{metric}": floor, metric: trained}))
    label = "kNN" if metric == "knn_top1" else metric
    assert trained >= floor + margin, f"{name}: {label} {trained:.3f} after {steps} steps vs floor {floor:.3f}"
