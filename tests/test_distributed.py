"""Two processes (gloo, CPU) give the same loss and gradients as one process on the concatenated batch.

This is the paper's global batch: SimCLR's and CLIP's negatives gathered across processes with gradient,
and batch-norm statistics over the global batch (``GlobalBatchNorm``).
"""
import functools

import pytest
import torch

from distributed_helpers import assert_two_processes_match_one
from trainer.objectives import ObjectiveSpec, get_objective

BATCH = 8  # per process
SIZE = 16


def _objective(key: str):
    torch.manual_seed(0)
    options = {"simclr": {"projection_dim": 16, "projection_hidden_dim": 32},
               "clip": {"projection_dim": 16, "text": {"context_length": 8, "width": 32, "heads": 2, "layers": 1}}}[key]
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


def _build_simclr():
    return _objective("simclr")


def _build_clip():
    return _objective("clip")


@pytest.mark.parametrize("build,key", [(_build_simclr, "simclr"), (_build_clip, "clip")])
def test_two_processes_equal_one_process_on_the_global_batch(build, key, tmp_path):
    assert_two_processes_match_one(build, functools.partial(_batch, key), tmp_path)


def test_collectives_are_identities_without_a_process_group():
    from trainer.distributed import all_reduce_sum, gather_no_grad, gather_with_grad, world_size

    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x and gather_no_grad(x) is x
    assert torch.equal(all_reduce_sum(x.detach().clone()), x.detach()) and world_size() == 1
