"""Gradient caching: a large contrastive batch in small micro-batches, with the gradients of the large batch.

Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup" (open_clip's
``--accum-freq`` does the same for CLIP). Plain gradient accumulation would give each micro-batch only its own
negatives; caching keeps all of them:

1. embed every micro-batch without gradients (saving the RNG state each one started from);
2. compute the loss over the embeddings of the whole batch (negatives gathered across processes as usual) and
   backpropagate it to those cached embeddings only, which yields d loss / d embedding for every sample (and
   the gradients of parameters the loss uses directly, e.g. CLIP's logit scale);
3. re-embed each micro-batch with gradients, from the same RNG state, and backpropagate
   ``sum(embedding * cached_gradient)``: by the chain rule its parameter gradient is that micro-batch's share
   of the big batch's gradient.

Peak activation memory is one micro-batch's. The result equals one big-batch step exactly when the encoder
has no batch-dependent layers; batch norm normalises over each micro-batch instead (as in open_clip), and its
running statistics see every micro-batch twice.

An objective opts in by implementing ``embed(batch) -> {name: [n, ...]}`` (this process's embeddings, what the
loss acts on) and ``loss_from_embeddings(embeddings, batch) -> {"loss": ..., **metrics}``; its ``forward`` is
then ``loss_from_embeddings(embed(batch), batch)``.
"""
from __future__ import annotations

from typing import Callable

import torch

from trainer.distributed import is_distributed, world_size


def supports_grad_cache(objective) -> bool:
    return callable(getattr(objective, "embed", None)) and callable(getattr(objective, "loss_from_embeddings", None))


def split_batch(batch: dict, micro_batch_size: int) -> list[dict]:
    """Consecutive micro-batches of at most ``micro_batch_size`` rows; non-tensor values go to each."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    sizes = {v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.ndim > 0}
    if len(sizes) != 1:
        raise ValueError(f"cannot split a batch whose tensors have different lengths {sorted(sizes)}")
    rows = sizes.pop()
    return [{k: (v[start:start + micro_batch_size] if torch.is_tensor(v) and v.ndim > 0 else v) for k, v in batch.items()}
            for start in range(0, rows, micro_batch_size)]


class _RandomState:
    """The CPU (and current CUDA device's) RNG state, so a micro-batch's second pass draws the same numbers."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda)


def grad_cache_backward(objective, batch: dict, micro_batch_size: int,
                        backward: Callable[[torch.Tensor], None] = torch.Tensor.backward) -> dict[str, torch.Tensor]:
    """Accumulate the gradient of ``objective``'s loss over the whole ``batch`` into its parameters' ``.grad``,
    holding one micro-batch's activations at a time; returns the loss outputs.

    ``backward`` runs on the loss (pass ``accelerator.backward`` so mixed-precision loss scaling applies); the
    re-embedding passes backpropagate the already scaled cached gradients directly. The parameter gradients are
    this process's; under several processes average them with ``average_gradients`` (the embedding passes do
    not go through DistributedDataParallel).
    """
    if not supports_grad_cache(objective):
        raise ValueError(f"{type(objective).__name__} does not implement embed()/loss_from_embeddings(), "
                         f"so it cannot train in micro-batches with cached gradients")
    micro_batches = split_batch(batch, micro_batch_size)
    states, cached = [], []
    with torch.no_grad():
        for micro in micro_batches:
            states.append(_RandomState())
            cached.append(objective.embed(micro))
    embeddings = {k: torch.cat([c[k] for c in cached]).detach().requires_grad_(True) for k in cached[0]}
    outputs = objective.loss_from_embeddings(embeddings, batch)
    backward(outputs["loss"])
    after_loss = _RandomState()
    start = 0
    for micro, state in zip(micro_batches, states):
        state.restore()
        fresh = objective.embed(micro)
        rows = next(iter(fresh.values())).shape[0]
        surrogate = sum((fresh[k] * embeddings[k].grad[start:start + rows].to(fresh[k].dtype)).sum() for k in fresh)
        surrogate.backward()
        start += rows
    after_loss.restore()  # the RNG continues as if each micro-batch had been embedded once
    return outputs


def average_gradients(parameters) -> None:
    """Average ``.grad`` over processes (what DistributedDataParallel does in its backward); no-op on one."""
    if not is_distributed():
        return
    size = world_size()
    for param in parameters:
        if param.grad is not None:
            torch.distributed.all_reduce(param.grad)
            param.grad.div_(size)
