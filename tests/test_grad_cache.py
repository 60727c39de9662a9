"""Gradient caching (trainer.grad_cache): micro-batches with cached embedding gradients give the gradients of one
big batch (every negative kept), on one process and on two; the loop's --micro-batch-size uses it."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import trainer.objectives.clip  # noqa: F401  (registration)
import trainer.objectives.simclr  # noqa: F401
from distributed_helpers import gradients
from trainer.grad_cache import average_gradients, grad_cache_backward, split_batch, supports_grad_cache
from trainer.objectives import ObjectiveSpec, get_objective

SIZE = 16
ROWS = 8


def _simclr():
    # A ViT (layer norm only) and a linear projection: no batch-dependent layer, so caching must be exact.
    torch.manual_seed(0)
    spec = ObjectiveSpec(backbone="vit-micro-cifar", image_size=SIZE,
                         options={"projection_layers": 1, "projection_dim": 16, "temperature": 0.2})
    return get_objective("simclr").build(spec)


def _clip():
    torch.manual_seed(0)
    spec = ObjectiveSpec(backbone="vit-micro-cifar", image_size=SIZE,
                         options={"projection_dim": 16, "text": {"width": 32, "heads": 2, "layers": 1, "context_length": 8}})
    return get_objective("clip").build(spec)


def _simclr_batch(rows: int = ROWS) -> dict:
    generator = torch.Generator().manual_seed(3)
    return {"view0": torch.randn(rows, 3, SIZE, SIZE, generator=generator),
            "view1": torch.randn(rows, 3, SIZE, SIZE, generator=generator),
            "label": torch.arange(rows), "id": torch.arange(rows)}


def _clip_batch(rows: int = ROWS) -> dict:
    generator = torch.Generator().manual_seed(4)
    return {"image": torch.randn(rows, 3, SIZE, SIZE, generator=generator),
            "tokens": torch.randint(1, 400, (rows, 8), generator=generator), "id": torch.arange(rows)}


def _full_batch_gradients(build, batch: dict) -> tuple[torch.Tensor, dict]:
    model = build()
    loss = model(batch)["loss"]
    loss.backward()
    return loss.detach(), gradients(model)


@pytest.mark.parametrize("build,make_batch", [(_simclr, _simclr_batch), (_clip, _clip_batch)])
@pytest.mark.parametrize("micro", [1, 3, 4])
def test_cached_micro_batches_give_the_big_batch_gradients(build, make_batch, micro):
    batch = make_batch()
    want_loss, want = _full_batch_gradients(build, batch)
    model = build()
    outputs = grad_cache_backward(model, batch, micro)
    assert torch.allclose(outputs["loss"].detach(), want_loss, atol=1e-6)
    got = gradients(model)
    assert got.keys() == want.keys()  # includes CLIP's logit scale, used by the loss only
    for name, grad in want.items():
        assert torch.allclose(got[name], grad, atol=1e-5, rtol=1e-4), name


def test_plain_accumulation_would_lose_the_negatives():
    """The check above can fail: summing per-micro-batch losses gives a different gradient."""
    batch = _simclr_batch()
    _, want = _full_batch_gradients(_simclr, batch)
    model = _simclr()
    for micro in split_batch(batch, 4):
        (model(micro)["loss"] / 2).backward()
    got = gradients(model)
    assert any(not torch.allclose(got[name], grad, atol=1e-5, rtol=1e-4) for name, grad in want.items())


def test_rng_is_replayed_for_the_second_pass():
    """Dropout draws the same mask in the cached and the re-embedding pass of a micro-batch."""
    model = _simclr()
    model.projector.insert(0, torch.nn.Dropout(0.5))
    batch = _simclr_batch()
    torch.manual_seed(7)
    outputs = grad_cache_backward(model, batch, 4)
    cached = gradients(model)
    reference = _simclr()
    reference.projector.insert(0, torch.nn.Dropout(0.5))
    torch.manual_seed(7)
    halves = split_batch(batch, 4)
    embeddings = []
    for half in halves:  # the same draws in the same order as the cached pass
        embeddings.append(reference.embed(half))
    joined = {k: torch.cat([e[k] for e in embeddings]) for k in embeddings[0]}
    loss = reference.loss_from_embeddings(joined, batch)["loss"]
    loss.backward()
    assert torch.allclose(outputs["loss"].detach(), loss.detach(), atol=1e-6)
    for name, grad in gradients(reference).items():
        assert torch.allclose(cached[name], grad, atol=1e-5, rtol=1e-4), name


def test_split_batch_and_support_checks():
    parts = split_batch({"a": torch.arange(7), "b": torch.zeros(7, 2), "name": "x"}, 3)
    assert [p["a"].tolist() for p in parts] == [[0, 1, 2], [3, 4, 5], [6]] and parts[2]["name"] == "x"
    with pytest.raises(ValueError, match="different lengths"):
        split_batch({"a": torch.arange(3), "b": torch.arange(4)}, 2)
    with pytest.raises(ValueError, match=">= 1"):
        split_batch({"a": torch.arange(3)}, 0)
    assert supports_grad_cache(_simclr()) and supports_grad_cache(_clip())
    import trainer.objectives.byol  # noqa: F401

    byol = get_objective("byol").build(ObjectiveSpec(backbone="cnn-small", image_size=SIZE))
    assert not supports_grad_cache(byol)
    with pytest.raises(ValueError, match="embed"):
        grad_cache_backward(byol, _simclr_batch(), 4)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # first: a forked child must not enter a multi-threaded OpenMP region
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model = _simclr()
    batch = {k: v[rank * ROWS:(rank + 1) * ROWS] for k, v in _simclr_batch(2 * ROWS).items()}
    outputs = grad_cache_backward(model, batch, 3)
    average_gradients(model.parameters())
    torch.save({"loss": outputs["loss"].detach(), "grads": gradients(model)}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_with_micro_batches_match_one_big_batch(tmp_path):
    want_loss, want = _full_batch_gradients(_simclr, _simclr_batch(2 * ROWS))
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.allclose(result["loss"], want_loss, atol=1e-6)
        for name, grad in want.items():
            assert torch.allclose(result["grads"][name], grad, atol=1e-5, rtol=1e-4), (rank, name)


@pytest.mark.slow
def test_pretrain_with_micro_batches(cifar_2k_shards, tmp_path):
    import json

    from trainer.pretrain import main

    common = ["--objective", "simclr", "--train-data", f"{cifar_2k_shards}/train-*.tar.gz", "--backbone", "cnn-small",
              "--batch-size", "32", "--max-steps", "3", "--log-every", "1", "--checkpoint-every", "0",
              "--num-workers", "1", "--set", "projection_hidden_dim=64"]
    assert main([*common, "--output", str(tmp_path / "micro"), "--micro-batch-size", "8", "--channels-last"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "micro" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] > 0 for r in rows)
    import trainer.objectives.byol  # noqa: F401

    byol = ["--objective", "byol", *common[2:], "--output", str(tmp_path / "byol"), "--micro-batch-size", "8"]
    assert main(byol) == 2  # a clear error: byol has no embed()/loss_from_embeddings() split
    with pytest.raises(SystemExit):
        main([*common, "--output", str(tmp_path / "bad"), "--micro-batch-size", "64"])  # larger than the batch



@pytest.mark.parametrize("micro_batch_size", [None, 4])
def test_the_step_stops_on_a_non_finite_loss_before_the_optimizer_step(micro_batch_size, monkeypatch):
    """trainer.loop.train_step checks the loss once, with or without micro-batches: NonFiniteLoss names the step;
    without micro-batches no backward pass runs on it."""
    import contextlib
    from types import SimpleNamespace

    from trainer.checkpoint import TrainState
    from trainer.config import TrainConfig
    from trainer.loop import NonFiniteLoss, StepContext, train_step

    torch.manual_seed(0)
    model = get_objective("simclr").build(ObjectiveSpec(backbone="cnn-small", image_size=SIZE,
                                                        options={"projection_dim": 16, "projection_hidden_dim": 32}))
    real = type(model).loss_from_embeddings

    def nan_loss(self, embeddings, batch):
        outputs = real(self, embeddings, batch)
        return {**outputs, "loss": outputs["loss"] * float("nan")}

    monkeypatch.setattr(type(model), "loss_from_embeddings", nan_loss)
    backward_calls = []
    accelerator = SimpleNamespace(autocast=contextlib.nullcontext,
                                  backward=lambda loss: (backward_calls.append(1), loss.backward()))
    state = TrainState()
    state.step = 7
    ctx = StepContext(accelerator=accelerator, objective=model, task=model, optimizer=None, state=state,
                      config=TrainConfig(batch_size=ROWS, micro_batch_size=micro_batch_size, output="RUN"), views=None,
                      urls=[], total_steps=10, base_lr=0.1, metrics_path="")
    with pytest.raises(NonFiniteLoss, match=r"loss is nan at step 7.*RUN/checkpoints"):
        train_step(ctx, _simclr_batch())
    if micro_batch_size is None:
        assert backward_calls == [] and all(p.grad is None for p in model.parameters())
    else:
        assert backward_calls == [1]  # inside the gradient cache, before the (one) check
    monkeypatch.undo()
    ctx.state.step = 8
    assert torch.isfinite(train_step(ctx, _simclr_batch())["loss"])
