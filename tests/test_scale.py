"""Training at scale: remote shards through ``pipe:`` URLs with an explicit epoch length (and a clear error when
an epoch cannot be known), and batched augmentation on the training device."""
import json
import logging

import pytest

from trainer.pretrain import main

pytestmark = pytest.mark.slow


def _common(shards, run) -> list[str]:
    pipes = "::".join(f"pipe:cat {shards}/train-{i:06d}.tar.gz" for i in range(2))
    return ["--objective", "simclr", "--train-data", pipes, "--output", str(run), "--backbone", "cnn-small",
            "--batch-size", "16", "--num-workers", "1", "--log-every", "1", "--checkpoint-every", "0",
            "--set", "projection_hidden_dim=64"]


def test_pipe_urls_train_with_an_explicit_epoch_length(cifar_2k_shards, tmp_path):
    run = tmp_path / "pipe"
    assert main([*_common(cifar_2k_shards, run), "--epochs", "0.024", "--samples-per-epoch", "2000"]) == 0
    config = json.loads((run / "train_config.json").read_text())
    assert config["total_steps"] == 3  # ceil(0.024 * 2000 / 16)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["corrupt_skipped"] == 0


def test_epochs_over_pipe_urls_without_an_epoch_length_is_a_clear_error(cifar_2k_shards, tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        assert main([*_common(cifar_2k_shards, tmp_path / "no-length"), "--epochs", "1"]) == 2
    assert "--samples-per-epoch" in caplog.text


@pytest.mark.parametrize("objective", ["simclr", "byol"])
def test_pretrain_with_batched_augmentation_on_the_device(cifar_2k_shards, tmp_path, objective):
    """--augment-on-device on: workers only decode, the loop makes view0/view1 as batched ops (here on the CPU);
    the same seed gives the same losses, and recipes it cannot serve are refused clearly."""
    import json

    import trainer.objectives.byol  # noqa: F401
    import trainer.objectives.pixpro  # noqa: F401
    from trainer.pretrain import main

    common = ["--objective", objective, "--train-data", f"{cifar_2k_shards}/train-*.tar.gz", "--backbone", "cnn-small",
              "--batch-size", "16", "--max-steps", "3", "--log-every", "1", "--checkpoint-every", "0",
              "--num-workers", "1", "--augment-on-device", "on"]
    losses = []
    for run in ("a", "b"):
        assert main([*common, "--output", str(tmp_path / run)]) == 0
        losses.append([json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()])
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    pixpro = ["--objective", "pixpro", *common[2:], "--output", str(tmp_path / "pixpro")]
    assert main(pixpro) == 2  # crop geometry travels with pixpro's views: not a plain two-view recipe


def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(cifar_2k_shards, tmp_path,
                                                                                     monkeypatch, caplog):
    """The loss turns NaN in the fifth step (step index 4): the run exits with status 3 and a message naming the
    step, checkpoints up to step 4 are intact and nothing later is written; --resume then finishes the run."""
    import torch

    from trainer.objectives import get_objective

    simclr, calls = get_objective("simclr"), []
    real_forward = simclr.forward

    def nan_in_fifth_step(self, batch):
        calls.append(1)
        outputs = real_forward(self, batch)
        return {**outputs, "loss": outputs["loss"] * torch.tensor(float("nan"))} if len(calls) == 5 else outputs

    run = tmp_path / "nan"
    args = ["--objective", "simclr", "--train-data", f"{cifar_2k_shards}/train-*.tar.gz", "--output", str(run),
            "--backbone", "cnn-small", "--batch-size", "8", "--image-size", "16", "--max-steps", "6",
            "--checkpoint-every", "2", "--log-every", "1", "--num-workers", "1", "--set", "projection_hidden_dim=32"]
    monkeypatch.setattr(simclr, "forward", nan_in_fifth_step)
    with caplog.at_level(logging.ERROR):
        assert main(args) == 3
    assert "loss is nan at step 4" in caplog.text and "last good checkpoint" in caplog.text
    assert len(calls) == 5  # stopped at the first non-finite loss
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    assert not (run / "model").exists()
    monkeypatch.setattr(simclr, "forward", real_forward)
    assert main([*args, "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_bf16_autocast_runs_the_objective_in_bfloat16_on_the_cpu(cifar_2k_shards, tmp_path, monkeypatch):
    """--mixed-precision bf16 goes through Accelerate's autocast: the objective's forward runs with bfloat16
    autocast enabled, and the losses stay finite."""
    import math

    import torch

    from trainer.objectives import get_objective

    simclr, seen = get_objective("simclr"), []
    real_forward = simclr.forward

    def recording_forward(self, batch):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real_forward(self, batch)

    from accelerate.state import AcceleratorState

    monkeypatch.setattr(simclr, "forward", recording_forward)
    run = tmp_path / "bf16"
    # Accelerate keeps one process-wide state: earlier in-process runs fixed it at fp32, so start from a clean one
    # here and leave a clean one for the tests after this.
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        code = main(["--objective", "simclr", "--train-data", f"{cifar_2k_shards}/train-*.tar.gz", "--output", str(run),
                     "--backbone", "cnn-small", "--batch-size", "8", "--image-size", "16", "--max-steps", "2",
                     "--checkpoint-every", "0", "--log-every", "1", "--num-workers", "1", "--mixed-precision", "bf16",
                     "--set", "projection_hidden_dim=32"])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert code == 0
    assert seen and all(entry == (True, torch.bfloat16) for entry in seen)
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
