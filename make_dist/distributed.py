"""Every collective make-dist runs, in one module (torch.distributed: gloo on
the CPU, NCCL on GPUs). Without an initialised process group each one is
what it would be for a single rank.

The loss's columns come from `gather_rows`, an all-gather whose backward
sums every rank's gradient of the gathered rows and hands each rank its own
(a reduce-scatter). Ranks may hold different numbers of rows, none
included: collectives need equal shapes, so each block travels padded to the
largest and is cut back after.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def sum_detached(x: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of a tensor, outside autograd."""
    x = x.detach().clone()
    if world_size() > 1:
        dist.all_reduce(x)
    return x


def lowest(value: int, device: torch.device) -> int:
    """The smallest of every rank's `value` (ranks agreeing on an outcome, e.g. a checkpoint that loaded)."""
    x = torch.tensor([value], dtype=torch.int64, device=device)
    if world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MIN)
    return int(x.item())


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def batch_sizes(rows: int, device: torch.device, given: Sequence[int] | None = None) -> list[int]:
    """Every rank's number of rows, in rank order: `given` (checked against
    this rank's), or exchanged in one all-gather of one number per rank (read
    back to the host)."""
    world = world_size()
    if world == 1:
        return [rows]
    if given is not None:
        given = [int(n) for n in given]
        if len(given) != world or given[rank()] != rows:
            raise ValueError(f"rows per rank {given} do not match rank {rank()} of {world}, "
                             f"which holds {rows}")
        return given
    mine = torch.tensor([rows], device=device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    return [int(n) for n in torch.cat(every).tolist()]


def gather_rows(parts: dict[str, torch.Tensor], sizes: Sequence[int]) -> dict[str, torch.Tensor]:
    """Every rank's rows of each (rows, features) tensor, in rank order, with
    gradient: one all-gather per dtype (tensors of one dtype travel packed)."""
    if len(sizes) == 1:
        return dict(parts)
    gathered = {}
    for dtype in dict.fromkeys(p.dtype for p in parts.values()):
        names = [name for name, p in parts.items() if p.dtype == dtype]
        widths = [parts[name].shape[1] for name in names]
        packed = _GatherWithGrad.apply(torch.cat([parts[name] for name in names], 1), list(sizes))
        gathered.update(zip(names, packed.split(widths, 1)))
    return gathered


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes):
        most = max(sizes)
        ctx.rank, ctx.sizes = dist.get_rank(), sizes
        if most == 0:
            return x.new_empty((0,) + x.shape[1:])
        padded = x.new_zeros((most,) + x.shape[1:])
        padded[: x.shape[0]] = x
        blocks = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(blocks, padded)
        return torch.cat([block[:n] for block, n in zip(blocks, sizes)], 0)

    @staticmethod
    def backward(ctx, grad):
        sizes, me = ctx.sizes, ctx.rank
        most = max(sizes)
        if most == 0:
            return grad.new_empty((0,) + grad.shape[1:]), None
        padded = grad.new_zeros((len(sizes), most) + grad.shape[1:])
        for r, block in enumerate(grad.split(sizes, 0)):
            padded[r, : sizes[r]] = block
        if dist.get_backend() == "nccl":
            out = grad.new_empty((most,) + grad.shape[1:])
            dist.reduce_scatter_tensor(out, padded.flatten(0, 1).contiguous())
        else:  # gloo has no reduce-scatter: sum everything, keep our block
            dist.all_reduce(padded)
            out = padded[me]
        return out[: sizes[me]], None
