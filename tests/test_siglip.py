"""SigLIP (Zhai et al. 2023): the pairwise sigmoid loss against hand-worked values, its split into per-process
blocks, the paper's initial temperature and bias, gradients to both towers, micro-batches, the model card, and
2 (3, 4) processes exchanging text blocks round the ring = 1 process holding the whole batch."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import trainer.objectives.clip  # noqa: F401  (registration)
import trainer.objectives.siglip  # noqa: F401
from distributed_helpers import assert_two_processes_match_one, gradients
from trainer.grad_cache import grad_cache_backward
from trainer.losses import siglip_loss, siglip_negatives_loss
from trainer.objectives import ObjectiveSpec, get_objective
from trainer.objectives.siglip import sigmoid_loss_over_processes

SIZE = 16
TEXT = {"width": 32, "heads": 2, "layers": 1, "context_length": 8}


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_sigmoid_loss_matches_a_hand_worked_example() -> None:
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # t = 2, b = -1: logits t<x,y> + b = [[1, 0.2], [-1, 0.6]]; -log sigmoid(z l) = softplus(-z l).
    want = (_softplus(-1.0) + _softplus(0.2) + _softplus(-1.0) + _softplus(-0.6)) / 2  # / number of images
    assert siglip_loss(image, text, 2.0, -1.0).item() == pytest.approx(want, rel=1e-6)
    want_negatives = (_softplus(1.0) + _softplus(0.2) + _softplus(-1.0) + _softplus(0.6)) / 2
    assert siglip_negatives_loss(image, text, 2.0, -1.0).item() == pytest.approx(want_negatives, rel=1e-6)
    # A block of 3 foreign texts is divided by the 2 images of its rows.
    three = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    want_three = (_softplus(1.0) + _softplus(0.2) + _softplus(-1.0) + _softplus(-1.0) + _softplus(0.6)
                  + _softplus(1.0)) / 2
    assert siglip_negatives_loss(image, three, 2.0, -1.0).item() == pytest.approx(want_three, rel=1e-6)


def test_blocks_add_up_to_the_whole_batch_loss() -> None:
    """Each half's images against its own texts plus against the other half's, averaged over the halves, is the
    loss of the whole batch: what the processes compute between them."""
    generator = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(6, 5, generator=generator), dim=1)
    text = F.normalize(torch.randn(6, 5, generator=generator), dim=1)
    scale, bias = torch.tensor(3.0), torch.tensor(-2.0)
    whole = siglip_loss(image, text, scale, bias)
    halves = [(image[:3], text[:3], text[3:]), (image[3:], text[3:], text[:3])]
    shares = [siglip_loss(i, t, scale, bias) + siglip_negatives_loss(i, other, scale, bias) for i, t, other in halves]
    assert torch.allclose(whole, sum(shares) / 2, rtol=1e-6)


def test_loss_refuses_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="3 images but 2 texts"):
        siglip_loss(torch.zeros(3, 4), torch.zeros(2, 4), 1.0, 0.0)
    with pytest.raises(ValueError, match="one width"):
        siglip_negatives_loss(torch.zeros(3, 4), torch.zeros(3, 5), 1.0, 0.0)


def _siglip(**options):
    torch.manual_seed(0)
    spec = ObjectiveSpec(backbone="vit-micro-cifar", image_size=SIZE,
                         options={"projection_dim": 16, "text": TEXT, **options})
    return get_objective("siglip").build(spec)


def _batch(rows: int = 8) -> dict:
    generator = torch.Generator().manual_seed(4)
    return {"image": torch.randn(rows, 3, SIZE, SIZE, generator=generator),
            "tokens": torch.randint(1, 400, (rows, 8), generator=generator), "id": torch.arange(rows)}


def test_paper_initial_temperature_and_bias() -> None:
    model = _siglip()
    assert model.logits.logit_scale.item() == pytest.approx(math.log(10.0))  # t' = log 10
    assert model.logits.logit_bias.item() == pytest.approx(-10.0)
    outputs = model(_batch())
    assert outputs["logit_scale"].item() == pytest.approx(10.0) and outputs["logit_bias"].item() == pytest.approx(-10.0)
    assert model.model_card_extras() == pytest.approx({"logit_scale": 10.0, "logit_bias": -10.0})


def test_objective_loss_is_the_sigmoid_loss_of_its_embeddings() -> None:
    model = _siglip(init_logit_scale=4.0, init_logit_bias=-1.5)
    batch = _batch()
    with torch.no_grad():
        embeddings = model.embed(batch)
        want = siglip_loss(F.normalize(embeddings["image"], dim=1), F.normalize(embeddings["text"], dim=1), 4.0, -1.5)
        assert torch.allclose(model.loss_from_embeddings(embeddings, batch)["loss"], want, rtol=1e-5)


def test_gradients_reach_both_towers_and_the_logit_parameters() -> None:
    model = _siglip()
    model(_batch())["loss"].backward()
    grads = gradients(model)
    for prefix in ("encoder.backbone.", "encoder.image_projection.", "encoder.text.", "logits.logit_scale",
                   "logits.logit_bias"):
        norms = [g.norm().item() for name, g in grads.items() if name.startswith(prefix)]
        assert norms and max(norms) > 0, prefix


def test_learned_values_go_to_the_model_card_and_clamp_applies() -> None:
    model = _siglip(max_logit_scale=20.0)
    with torch.no_grad():
        model.logits.logit_scale.fill_(math.log(5.0))
        model.logits.logit_bias.fill_(-3.25)
    assert model.model_card_extras() == pytest.approx({"logit_scale": 5.0, "logit_bias": -3.25})
    with torch.no_grad():
        model.logits.logit_scale.fill_(math.log(50.0))
    assert model.model_card_extras()["logit_scale"] == pytest.approx(20.0)  # the multiplier training used


def test_clip_model_card_carries_its_logit_scale() -> None:
    spec = ObjectiveSpec(backbone="vit-micro-cifar", image_size=SIZE, options={"projection_dim": 16, "text": TEXT})
    clip = get_objective("clip").build(spec)
    assert clip.model_card_extras() == pytest.approx({"logit_scale": 1 / 0.07})


@pytest.mark.parametrize("bad,message", [({"init_logit_scale": 0}, "init_logit_scale must be > 0"),
                                         ({"init_logit_bias": "x"}, "init_logit_bias must be a number"),
                                         ({"max_logit_scale": 5.0}, "max_logit_scale"),
                                         ({"crop_scale": [0.9, 0.5]}, "crop_scale"),
                                         ({"projection_dim": 0}, "projection_dim")])
def test_bad_options_are_refused(bad, message) -> None:
    with pytest.raises(ValueError, match=message):
        _siglip(**bad)


@pytest.mark.parametrize("micro", [3, 4])
def test_micro_batches_give_the_big_batch_gradients(micro) -> None:
    batch = _batch()
    reference = _siglip()
    want_loss = reference(batch)["loss"]
    want_loss.backward()
    model = _siglip()
    outputs = grad_cache_backward(model, batch, micro)
    assert torch.allclose(outputs["loss"].detach(), want_loss.detach(), atol=1e-6)
    got, want = gradients(model), gradients(reference)
    assert got.keys() == want.keys()
    for name, grad in want.items():
        assert torch.allclose(got[name], grad, atol=1e-5, rtol=1e-4), name


def _build_cnn():
    # cnn-small has batch norm: the helper makes it global, so the one- and two-process runs agree exactly.
    torch.manual_seed(0)
    spec = ObjectiveSpec(backbone="cnn-small", image_size=SIZE,
                         options={"projection_dim": 16, "init_logit_bias": -2.0, "text": TEXT})
    return get_objective("siglip").build(spec)


def _global_batch() -> dict:
    return _batch(8)


def test_two_processes_match_one(tmp_path) -> None:
    assert_two_processes_match_one(_build_cnn, _global_batch, tmp_path)


ROWS, WIDTH = 2, 6


def _ring_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(world * ROWS, WIDTH, generator=generator)[rank * ROWS:(rank + 1) * ROWS].requires_grad_()
    text = torch.randn(world * ROWS, WIDTH, generator=generator)[rank * ROWS:(rank + 1) * ROWS].requires_grad_()
    scale, bias = torch.tensor(3.0, requires_grad=True), torch.tensor(-1.0, requires_grad=True)
    loss = sigmoid_loss_over_processes(image, text, scale, bias)
    loss.backward()
    torch.save({"loss": loss.detach(), "image": image.grad, "text": text.grad, "scale": scale.grad, "bias": bias.grad},
               os.path.join(out_dir, f"ring{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [3, 4, 5])
def test_ring_exchange_over_more_processes_matches_one(world, tmp_path) -> None:
    """3 processes use one two-way exchange, 4 also the one-way step for the block halfway round the ring, 5 pass
    the blocks they received on in a second two-way exchange.
    Each process's embedding gradient is the whole-batch gradient of all processes' shares (world x the mean's,
    which the averaging of parameter gradients then divides back); scale and bias gradients average to one
    process's."""
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(world * ROWS, WIDTH, generator=generator).requires_grad_()
    text = torch.randn(world * ROWS, WIDTH, generator=generator).requires_grad_()
    scale, bias = torch.tensor(3.0, requires_grad=True), torch.tensor(-1.0, requires_grad=True)
    want = sigmoid_loss_over_processes(image, text, scale, bias)
    want.backward()
    mp.start_processes(_ring_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True,
                       start_method="fork")
    results = [torch.load(tmp_path / f"ring{rank}.pt") for rank in range(world)]
    for rank, result in enumerate(results):
        rows = slice(rank * ROWS, (rank + 1) * ROWS)
        assert torch.allclose(result["loss"], want.detach(), rtol=1e-5), rank
        assert torch.allclose(result["image"], world * image.grad[rows], rtol=1e-4, atol=1e-6), rank
        assert torch.allclose(result["text"], world * text.grad[rows], rtol=1e-4, atol=1e-6), rank
    for name, param in (("scale", scale), ("bias", bias)):
        mean = torch.stack([result[name] for result in results]).mean()
        assert torch.allclose(mean, param.grad, rtol=1e-4, atol=1e-6), name
