"""Collectives that are correct at world size 1 (no process group) and differentiable where needed."""
from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all processes along dim 0, in rank order, keeping the autograd graph.

    Gradients flowing back are summed over processes (reduce-scatter), so a loss computed identically on
    every rank over the gathered batch, followed by DDP's gradient averaging, gives exactly the gradient of
    that loss on one process holding the whole batch.
    """
    if not is_distributed():
        return tensor
    return _GatherWithGrad.apply(tensor)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0; backward sums the incoming gradients over processes and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rows, ctx.rank = tensor.shape[0], dist.get_rank()
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


class _AllReduceSumWithGrad(torch.autograd.Function):
    """all_reduce(SUM) whose backward is again an all_reduce(SUM) of the gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


@torch.no_grad()
def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all processes along dim 0 without gradient (queues, banks)."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def mean_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over processes (equal local batches), with gradient to every process's part."""
    return gather_with_grad(tensor.unsqueeze(0)).mean(dim=0)


def max_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """The maximum of a scalar over processes (no gradient)."""
    return gather_no_grad(tensor.reshape(1)).max()


@torch.no_grad()
def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes in place (Sinkhorn sums, centres); identity at world size 1."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class GlobalBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """Batch norm over the global batch, on any backend (PyTorch's SyncBatchNorm refuses CPU tensors).

    Per-channel sums, sums of squares and counts are all-reduced with autograd, so forward statistics and
    backward gradients are those of one process holding the concatenated batch. Without a process group,
    or in eval mode, it is plain batch norm.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(input)
        dims = [0] + list(range(2, input.dim()))
        channels = input.shape[1]
        local = torch.cat([
            input.sum(dims), (input * input).sum(dims),
            input.new_full((1,), input.numel() / channels),
        ])
        total = _AllReduceSumWithGrad.apply(local)
        count = total[-1]
        mean = total[:channels] / count
        var = (total[channels:2 * channels] / count - mean * mean).clamp_min(0.0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * count / (count - 1).clamp_min(1.0)
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.detach(), alpha=momentum)
        shape = [1, channels] + [1] * (input.dim() - 2)
        output = (input - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        return output

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {input.dim()}-D")


def convert_to_global_bn(module: torch.nn.Module) -> torch.nn.Module:
    """Replace every BatchNorm{1,2,3}d in ``module`` by ``GlobalBatchNorm`` carrying the same state."""
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        replacement = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        replacement.load_state_dict(module.state_dict())
        for name, param in replacement.named_parameters(recurse=False):  # frozen (momentum) copies stay frozen
            param.requires_grad_(getattr(module, name).requires_grad)
        replacement.train(module.training)
        return replacement
    for name, child in module.named_children():
        setattr(module, name, convert_to_global_bn(child))
    return module


def synchronise_batch_norm(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Global batch statistics across processes: PyTorch's SyncBatchNorm on GPUs, ``GlobalBatchNorm`` elsewhere."""
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return convert_to_global_bn(module)


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


@torch.no_grad()
def shuffle_batch(tensor: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle the global batch across processes (MoCo's shuffling BN, He et al. 2020 sec. 3.3).

    Gathers ``tensor`` [n, ...] from every process (equal n), permutes the N = n * world rows with one random
    permutation drawn on rank 0 and broadcast, and returns this rank's share of the shuffled rows [n, ...]
    and ``restore`` [N]: ``unshuffle_batch`` puts rows back in the original global order with it. At world
    size 1 it is a random permutation of the batch (the split-BN simulation shuffles before splitting).
    """
    gathered = gather_no_grad(tensor)
    permutation = torch.randperm(gathered.shape[0], device=tensor.device, generator=generator)
    if is_distributed():
        dist.broadcast(permutation, src=0)
    rows, index = tensor.shape[0], rank()
    return gathered[permutation[index * rows:(index + 1) * rows]], torch.argsort(permutation)


@torch.no_grad()
def unshuffle_batch(tensor: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
    """Undo ``shuffle_batch``: gather every rank's [n, ...] share of the shuffled rows and return the whole
    global batch [N, ...] in its original order (identical on every rank). This rank's own rows are
    ``[rank() * n : (rank() + 1) * n]``."""
    return gather_no_grad(tensor)[restore]


def all_reduce_sum_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes, keeping the autograd graph (a new tensor; the input is untouched): a loss computed
    from such sums identically on every rank, after DDP's gradient averaging, has the gradient of one process
    holding the whole batch (LeJEPA's characteristic-function sums). Identity at world size 1."""
    if not is_distributed():
        return tensor
    return _AllReduceSumWithGrad.apply(tensor)


@torch.no_grad()
def broadcast_from_first(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``tensor`` on every process, in place (a result computed once, e.g. k-means centroids);
    identity at world size 1."""
    if is_distributed():
        dist.broadcast(tensor, src=0)
    return tensor


# Neighbour exchange around the ring of processes (SigLIP's chunked negatives: Zhai et al. 2023, sec. 3.3; open_clip's
# SigLipLoss): each process sees every other process's block one at a time instead of one gathered matrix.

def _exchange(tensor: torch.Tensor, send_to: int, receive_from: int) -> torch.Tensor:
    """Send ``tensor`` to rank ``send_to`` and return the tensor of the same shape received from ``receive_from``."""
    received = torch.empty_like(tensor)
    requests = dist.batch_isend_irecv([dist.P2POp(dist.isend, tensor.contiguous(), send_to),
                                       dist.P2POp(dist.irecv, received, receive_from)])
    for request in requests:
        request.wait()
    return received


def _exchange_both_ways(to_left: torch.Tensor, to_right: torch.Tensor, left: int,
                        right: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Send ``to_left`` to rank ``left`` and ``to_right`` to rank ``right`` in one batch; returns (the tensor
    received from the left, the one received from the right), the neighbours' ``to_right`` and ``to_left``."""
    from_left, from_right = torch.empty_like(to_right), torch.empty_like(to_left)
    requests = dist.batch_isend_irecv([
        dist.P2POp(dist.isend, to_left.contiguous(), left), dist.P2POp(dist.isend, to_right.contiguous(), right),
        dist.P2POp(dist.irecv, from_left, left), dist.P2POp(dist.irecv, from_right, right),
    ])
    for request in requests:
        request.wait()
    return from_left, from_right


class _NeighbourExchange(torch.autograd.Function):
    """``_exchange`` whose backward sends the gradient of the received tensor back to its sender and receives the
    gradient of the sent tensor from its receiver, so gradients reach the process that computed the tensor."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, send_to: int, receive_from: int) -> torch.Tensor:
        ctx.send_to, ctx.receive_from = send_to, receive_from
        return _exchange(tensor, send_to, receive_from)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _exchange(grad, ctx.receive_from, ctx.send_to), None, None


class _NeighbourExchangeBothWays(torch.autograd.Function):
    """``_exchange_both_ways`` with gradients returned to the senders (the same exchange, directions swapped)."""

    @staticmethod
    def forward(ctx, to_left: torch.Tensor, to_right: torch.Tensor, left: int, right: int):
        ctx.left, ctx.right = left, right
        return _exchange_both_ways(to_left, to_right, left, right)

    @staticmethod
    def backward(ctx, grad_from_left: torch.Tensor, grad_from_right: torch.Tensor):
        # What came from the left goes back left; the left neighbour, doing the same, sends back the gradient
        # of the block we sent it (our to_left), and the right neighbour that of our to_right.
        grad_to_left, grad_to_right = _exchange_both_ways(grad_from_left, grad_from_right, ctx.left, ctx.right)
        return grad_to_left, grad_to_right, None, None


def neighbour_exchange_with_grad(tensor: torch.Tensor, send_to: int, receive_from: int) -> torch.Tensor:
    """Send ``tensor`` to rank ``send_to``, return what rank ``receive_from`` sent (same shape and dtype), keeping
    the autograd graph across processes: the gradient of the returned tensor flows back to ``receive_from``'s
    ``tensor``. Every process must call it at the same point (point-to-point, matched in order)."""
    return _NeighbourExchange.apply(tensor, send_to, receive_from)


def ring_exchange_with_grad(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """Yield every other process's ``tensor`` once, one block at a time, with gradients flowing back to its sender.

    The blocks travel round the ring of ranks in both directions (open_clip's "bidir" SigLipLoss exchange): step
    k brings the blocks of ranks ``rank - k`` and ``rank + k``, each passed on by the neighbour that received it
    the step before, so only neighbours ever talk and ceil((world - 1) / 2) steps see every block. A loss summed
    over the yielded blocks, backpropagated on every process, gives each process the gradient of its own block
    from every process's loss. All processes must exhaust the iterator (blocks of equal shape); at world size 1
    it yields nothing.
    """
    if not is_distributed():
        return
    size, me = world_size(), rank()
    left, right = (me - 1) % size, (me + 1) % size
    to_left = to_right = tensor
    pairs, odd = divmod(size - 1, 2)
    for _ in range(pairs):
        from_left, from_right = _NeighbourExchangeBothWays.apply(to_left, to_right, left, right)
        yield from_left
        yield from_right
        to_left, to_right = from_right, from_left  # pass each block on in the direction it was travelling
    if odd:  # an even world: the block halfway round the ring arrives from one side only
        yield neighbour_exchange_with_grad(to_right, right, left)
