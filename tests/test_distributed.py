"""Two processes (gloo, CPU) give the same loss and gradients as one process on the concatenated batch.

This is the paper's global batch: SimCLR's and CLIP's negatives gathered across processes with gradient,
and batch-norm statistics over the global batch (``GlobalBatchNorm``).
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.objectives import ObjectiveSpec, get_objective

BATCH = 8  # per process
SIZE = 16


def _objective(key: str):
    torch.manual_seed(0)
    options = {"simclr": {"projection_dim": 16, "projection_hidden_dim": 32},
               "clip": {"embed_dim": 16, "text": {"context_length": 8, "width": 32, "heads": 2, "layers": 1}}}[key]
    return get_objective(key).build(ObjectiveSpec(backbone="cnn-small", image_size=SIZE, options=options))


def _batch(key: str, rows: slice | None = None) -> dict:
    generator = torch.Generator().manual_seed(1)
    n = 2 * BATCH
    if key == "simclr":
        batch = {"view0": torch.randn(n, 3, SIZE, SIZE, generator=generator),
                 "view1": torch.randn(n, 3, SIZE, SIZE, generator=generator)}
    else:
        tokens = torch.randint(1, 1000, (n, 8), generator=generator)
        tokens[:, 0], tokens[:, 5], tokens[:, 6:] = 49406, 49407, 0
        batch = {"image": torch.randn(n, 3, SIZE, SIZE, generator=generator), "tokens": tokens}
    return {k: v[rows] for k, v in batch.items()} if rows is not None else batch


def _gradients(module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in module.named_parameters() if p.grad is not None}


def _worker(rank: int, key: str, init_file: str, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from trainer.distributed import convert_to_global_bn

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    objective = convert_to_global_bn(_objective(key))
    model = DistributedDataParallel(objective)
    outputs = model(_batch(key, slice(rank * BATCH, (rank + 1) * BATCH)))
    outputs["loss"].backward()
    torch.save({"loss": outputs["loss"].detach(), "grads": _gradients(objective)}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("key", ["simclr", "clip"])
def test_two_processes_equal_one_process_on_the_global_batch(key, tmp_path):
    reference = _objective(key)
    outputs = reference(_batch(key))
    outputs["loss"].backward()
    expected = _gradients(reference)

    mp.spawn(_worker, args=(key, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["loss"].item() == pytest.approx(outputs["loss"].item(), rel=1e-5, abs=1e-6)
        assert result["grads"].keys() == expected.keys()
        for name, grad in expected.items():
            assert torch.allclose(result["grads"][name], grad, rtol=1e-3, atol=1e-5), name


def test_collectives_are_identities_without_a_process_group():
    from trainer.distributed import all_reduce_sum, gather_no_grad, gather_with_grad, world_size

    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x and gather_no_grad(x) is x
    assert torch.equal(all_reduce_sum(x.detach().clone()), x.detach()) and world_size() == 1
