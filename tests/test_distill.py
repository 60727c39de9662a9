"""distill (LightlyTrain's distillation): the queue KL loss on hand-worked values, teachers of every kind giving the
same targets for the same model, the teacher frozen and absent from what is saved, bad teachers refused clearly,
and 2 processes computing what 1 process computes."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import trainer.objectives  # noqa: F401  (registration)
from distill_helpers import make_teacher
from distributed_helpers import assert_two_processes_match_one
from trainer.losses.distill import queue_distillation_loss
from trainer.models import load_model
from trainer.objectives import ObjectiveSpec, get_objective
from trainer.objectives.distill import auto_queue_size
from trainer.teacher import load_teacher

TEACHER_SIZE, STUDENT_SIZE = 24, 16  # different on purpose: the teacher resizes the student's view
TEACHER_MEAN, TEACHER_STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]  # not the student's (cnn-small: CIFAR's)


# -- the loss --------------------------------------------------------------------------------------------------


def test_loss_on_a_hand_worked_example() -> None:
    """Queue e1, e2; tau = 0.5. Row 0: teacher e1 (logits [2, 0]), student e2 (logits [0, 2]):
    KL = s(2) log(s(2)/s(-2)) + s(-2) log(s(-2)/s(2)) = 2 (s(2) - s(-2)) = 2 tanh(1), with s the sigmoid.
    Row 1: student = teacher, KL 0. Batch mean: tanh(1). The gradient of row 0's student logits is
    (p_s - p_t) / (B tau) = [-tanh(1), tanh(1)] after the queue's identity map; row 1's is zero."""
    queue = torch.eye(2)
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    student = torch.tensor([[0.0, 1.0], [0.0, 1.0]], requires_grad=True)
    loss = queue_distillation_loss(student, teacher, queue, temperature=0.5)
    assert loss.item() == pytest.approx(math.tanh(1.0), rel=1e-6)
    loss.backward()
    t = math.tanh(1.0)
    assert torch.allclose(student.grad, torch.tensor([[-t, t], [0.0, 0.0]]), atol=1e-6)


def test_loss_is_lightlytrain_kl_divergence_and_sends_no_gradient_to_targets() -> None:
    """The same value as LightlyTrain's formulation (torch KLDivLoss, batchmean, on softmaxes over the queue)."""
    generator = torch.Generator().manual_seed(0)
    student = F.normalize(torch.randn(5, 8, generator=generator), dim=1).requires_grad_()
    teacher = F.normalize(torch.randn(5, 8, generator=generator), dim=1).requires_grad_()
    queue = F.normalize(torch.randn(7, 8, generator=generator), dim=1)
    expected = torch.nn.KLDivLoss(reduction="batchmean")(F.log_softmax(student @ queue.T / 0.07, dim=1),
                                                        F.softmax(teacher @ queue.T / 0.07, dim=1))
    loss = queue_distillation_loss(student, teacher, queue, 0.07)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert teacher.grad is None and student.grad is not None
    assert queue_distillation_loss(teacher, teacher, queue, 0.07).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="queue must be"):
        queue_distillation_loss(student, teacher, queue[:, :4], 0.07)


def test_auto_queue_size_follows_lightlytrain_table() -> None:
    assert [auto_queue_size(n) for n in (10, 96, 1000, 2000, 50_000, None)] == [16, 32, 512, 1024, 8192, 8192]


# -- teachers --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_dirs(tmp_path_factory) -> dict[str, str]:
    """One random cnn-small teacher at 24 px with its own mean/std: as a RUN/model directory and exported to ONNX
    with float32 NCHW input and with uint8 NHWC input."""
    return make_teacher(tmp_path_factory.mktemp("teacher"), TEACHER_SIZE, TEACHER_MEAN, TEACHER_STD, seed=7)


def build_student(teacher: str, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    return get_objective("distill").build(ObjectiveSpec(
        backbone="cnn-small", image_size=STUDENT_SIZE, options={"teacher": teacher, **options}, num_train_samples=96))


def test_onnx_and_torch_teachers_give_the_same_targets(teacher_dirs) -> None:
    torch.manual_seed(1)
    pixels = torch.rand(6, 3, STUDENT_SIZE, STUDENT_SIZE)  # the student's view in [0, 1]: resized to 24 px
    torch_targets = F.normalize(load_teacher(teacher_dirs["model"])(pixels), dim=1)
    onnx_targets = F.normalize(load_teacher(teacher_dirs["onnx"])(pixels), dim=1)
    assert (torch_targets - onnx_targets).abs().max() <= 1e-4
    # uint8 NHWC encoders: the teacher's own input is 0-255 pixels; at its own size these are exact.
    pixels = torch.randint(0, 256, (6, 3, TEACHER_SIZE, TEACHER_SIZE)).float() / 255
    torch_targets = F.normalize(load_teacher(teacher_dirs["model"])(pixels), dim=1)
    uint8_targets = F.normalize(load_teacher(teacher_dirs["onnx_uint8"])(pixels), dim=1)
    assert (torch_targets - uint8_targets).abs().max() <= 1e-4
    # The teacher's input contract is its own: its mean/std, not the student's.
    reference, _ = load_model(teacher_dirs["model"])
    mean, std = torch.tensor(TEACHER_MEAN).view(1, 3, 1, 1), torch.tensor(TEACHER_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        direct = F.normalize(reference.encode_image((pixels - mean) / std), dim=1)
    assert (direct - torch_targets).abs().max() <= 1e-5


def test_objective_losses_agree_for_onnx_and_torch_teachers(teacher_dirs) -> None:
    torch.manual_seed(2)
    batch = {"image": torch.randn(8, 3, STUDENT_SIZE, STUDENT_SIZE)}
    losses, grads = [], []
    for kind in ("model", "onnx"):
        objective = build_student(teacher_dirs[kind], mixup=False)
        loss = objective(batch)["loss"]
        loss.backward()
        losses.append(loss.item())
        grads.append(objective.projection.weight.grad.clone())
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-6)


def test_torch_teacher_is_frozen_and_outside_what_is_trained_and_saved(teacher_dirs) -> None:
    objective = build_student(teacher_dirs["model"], queue_size=12)
    teacher = objective.teacher.model
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher_params = {id(p) for p in teacher.parameters()}
    assert not teacher_params & {id(p) for p in objective.parameters()}
    assert all(not p.requires_grad for p in teacher.parameters())
    keys = set(objective.state_dict())
    assert {k.split(".")[0] for k in keys} == {"encoder", "projection", "teacher_queue", "queue_ptr", "queue_filled"}
    optimizer = torch.optim.AdamW([g for g in objective.parameter_groups(1e-4) if g["params"]], lr=1e-2)
    objective.train()
    assert not teacher.training  # objective.train() does not reach it: its batch norms keep their statistics
    for step in range(3):
        torch.manual_seed(10 + step)
        objective({"image": torch.randn(8, 3, STUDENT_SIZE, STUDENT_SIZE)})["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), f"teacher {key} changed"
    # The queue: 3 batches of 8 in 12 rows, filled, the pointer wrapped to 24 % 12, and it travels in state_dict.
    assert int(objective.queue_filled) == 12 and int(objective.queue_ptr) == 0
    fresh = build_student(teacher_dirs["model"], queue_size=12)
    fresh.load_state_dict(objective.state_dict())
    assert torch.equal(fresh.teacher_queue, objective.teacher_queue) and int(fresh.queue_filled) == 12
    assert objective.model_card_extras()["distilled_from"]["teacher"] == teacher_dirs["model"]


def test_enqueue_is_fifo_and_keeps_the_first_rows_of_an_oversized_batch(teacher_dirs) -> None:
    objective = build_student(teacher_dirs["onnx"], queue_size=4)
    rows = torch.arange(12.0).view(6, 2).repeat(1, objective.teacher.dim // 2)
    objective.enqueue(rows[:3])
    assert int(objective.queue_filled) == 3 and int(objective.queue_ptr) == 3
    objective.enqueue(rows[3:5])  # rows 3, 4 go to slots 3, 0
    assert torch.equal(objective.teacher_queue[:, 0], torch.tensor([8.0, 2.0, 4.0, 6.0]))
    assert int(objective.queue_filled) == 4 and int(objective.queue_ptr) == 1
    objective.enqueue(rows)  # 6 rows into 4 slots: the first 4, from slot 1
    assert torch.equal(objective.teacher_queue[:, 0], torch.tensor([6.0, 0.0, 2.0, 4.0]))


def test_a_run_saves_only_the_student(teacher_dirs, tmp_path) -> None:
    """Three steps through the command line with a RUN/model teacher: RUN/model holds the student's cnn-small and
    nothing of the teacher (same keys as a plain cnn-small model), the checkpoint holds the queue but not the
    teacher, and the model card names the teacher."""
    from onnx_fixtures import make_shard
    from safetensors import safe_open

    from trainer.models import EmbeddingModel, ModelConfig
    from trainer.pretrain import main as pretrain

    make_shard(tmp_path / "data" / "train-000000.tar", count=32, seed=3)
    run = tmp_path / "run"
    assert pretrain(["--objective", "distill", "--train-data", f"{tmp_path}/data/train-*.tar", "--output", str(run),
                     "--backbone", "cnn-small", "--batch-size", "16", "--max-steps", "3", "--checkpoint-every", "2",
                     "--num-workers", "0", "--set", f"teacher={teacher_dirs['model']}"]) == 0
    with safe_open(str(run / "model" / "model.safetensors"), "pt") as handle:
        saved = set(handle.keys())
    assert saved == set(EmbeddingModel(ModelConfig(backbone="cnn-small")).state_dict())
    card = json.loads((run / "model" / "config.json").read_text())
    assert card["objective"] == "distill" and card["distilled_from"]["teacher"] == teacher_dirs["model"]
    assert card["distilled_from"]["teacher_image_size"] == TEACHER_SIZE
    checkpoint = sorted((run / "checkpoints").glob("step_*"))[-1]
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as handle:
        stored = set(handle.keys())
    assert "teacher_queue" in stored and "queue_filled" in stored
    assert all(key.split(".")[0] in ("encoder", "projection", "teacher_queue", "queue_ptr", "queue_filled")
               for key in stored), sorted(stored)


# -- bad teachers ----------------------------------------------------------------------------------------------


def test_no_teacher_is_refused_with_what_to_give() -> None:
    with pytest.raises(ValueError, match=r"distill needs a teacher: --set teacher=PATH"):
        get_objective("distill").build(ObjectiveSpec(backbone="cnn-small", image_size=STUDENT_SIZE))


def test_bad_teacher_paths_are_refused_clearly(teacher_dirs, tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / "model").symlink_to(teacher_dirs["model"])
    weights = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.zeros(1)}, weights)
    broken = tmp_path / "broken_onnx"
    broken.mkdir()
    (broken / "preprocess.json").write_text("{not json")
    cases = [
        (str(tmp_path / "missing"), {}, "does not exist"),
        (str(tmp_path / "empty"), {}, "neither preprocess.json nor config.json"),
        (str(run), {}, "did you mean"),
        (str(weights), {}, "teacher_backbone=NAME"),
        (str(broken), {}, "not a usable exported ONNX encoder"),
        (teacher_dirs["onnx"], {"teacher_backbone": "resnet18"}, "carries its own architecture"),
        (teacher_dirs["model"], {"teacher_backbone": "resnet18"}, "is a 'cnn-small'"),
        (teacher_dirs["onnx"], {"teacher_image_size": 32}, "made for 24 px images"),
    ]
    for path, options, message in cases:
        with pytest.raises(ValueError, match=message):
            build_student(path, **options)
    with pytest.raises(ValueError, match="queue_size must be"):
        build_student(teacher_dirs["onnx"], queue_size=0)


def test_the_command_line_exits_2_without_a_teacher(tmp_path, caplog) -> None:
    from onnx_fixtures import make_shard

    from trainer.pretrain import main as pretrain

    make_shard(tmp_path / "train-000000.tar", count=8)
    status = pretrain(["--objective", "distill", "--train-data", f"{tmp_path}/train-*.tar", "--output",
                       str(tmp_path / "run"), "--backbone", "cnn-small", "--max-steps", "1", "--num-workers", "0"])
    assert status == 2 and "distill needs a teacher" in caplog.text


def test_weights_file_teacher_loads_with_its_backbone(tmp_path) -> None:
    """A torchvision resnet18 state_dict, written by torchvision itself, as the teacher: its targets are the plain
    torchvision model's features (fc = Identity) on the teacher's normalisation of the pixels."""
    pytest.importorskip("trainer.init_from")
    import torchvision

    torch.manual_seed(3)
    reference = torchvision.models.resnet18(num_classes=1000).eval()
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    teacher = load_teacher(str(tmp_path / "resnet18.pth"), backbone="resnet18", image_size=32)
    assert teacher.kind == "weights" and teacher.dim == 512 and teacher.contract.image_size == 32
    pixels = torch.rand(2, 3, 32, 32)
    reference.fc = torch.nn.Identity()
    mean = torch.tensor(teacher.contract.mean).view(1, 3, 1, 1)
    std = torch.tensor(teacher.contract.std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = reference((pixels - mean) / std)
    assert torch.allclose(teacher(pixels), expected, atol=1e-4)
    with pytest.raises(ValueError, match="does not load into a 'resnet34'"):
        load_teacher(str(tmp_path / "resnet18.pth"), backbone="resnet34", image_size=32)


# -- processes -------------------------------------------------------------------------------------------------

_TEACHER_FOR_WORKERS: list[str] = []  # set by the test before the workers fork


def _build_for_processes():
    torch.manual_seed(0)
    return get_objective("distill").build(ObjectiveSpec(
        backbone="cnn-small", image_size=STUDENT_SIZE, num_train_samples=96,
        options={"teacher": _TEACHER_FOR_WORKERS[0], "mixup": False, "queue_size": 12}))


def _batch_for_processes(step: int = 0) -> dict:
    generator = torch.Generator().manual_seed(100 + step)
    return {"image": torch.randn(8, 3, STUDENT_SIZE, STUDENT_SIZE, generator=generator)}


def test_two_processes_match_one(teacher_dirs, tmp_path) -> None:
    """The queue takes the global batch and the loss is over the global batch: with the queue wrapping around
    (2 steps of 8 into 12 rows) two processes give one process's losses and gradients."""
    _TEACHER_FOR_WORKERS[:] = [teacher_dirs["model"]]
    assert_two_processes_match_one(_build_for_processes, _batch_for_processes, tmp_path, steps=2)
