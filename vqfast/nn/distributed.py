"""Codebook synchronisation across the processes of a ``torch.distributed`` group.

``VectorQuantize(sync_codebook=True)`` keeps one codebook for the whole group, as if a single
process saw the concatenation of every rank's batch (rank 0's rows first):

* EMA statistics (per-code counts and sums) are summed over the ranks before the EMA step
  (``all_reduce_sum_``), so every rank applies the same update;
* k-means initialization and dead-code restarts are decided on rank 0 from the rows of every
  rank (``gather_rows``; only rank 0's rows with ``sync_kmeans=False``) and the resulting
  codebook state is broadcast (``broadcast_``), so no rank's random draws can diverge;
* a learnable codebook's gradient is averaged over the ranks (``average_gradient``).

Hang-safety: every rank issues the same collectives, in the same order, for the same call,
whatever its own batch holds (no rows, all rows masked out, or a different row count): which
collectives run depends only on the layer's configuration, ``module.training`` / frozen /
``ema_update`` and on values that are already identical on every rank (the synced buffers, or
a flag broadcast from rank 0). Eval forwards issue none, so one rank may evaluate alone.

The collectives run outside ``torch.compile``'s graph (``torch._dynamo.disable``): the codebook
maintenance is data dependent and in place, so it is a graph break either way.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

_disable = torch._dynamo.disable


def is_distributed() -> bool:
    """True inside an initialized process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_leader() -> bool:
    """True on the rank that decides k-means init and dead-code restarts (rank 0), or alone."""
    return not is_distributed() or dist.get_rank() == 0


@_disable
def all_reduce_sum_(*tensors: torch.Tensor) -> None:
    """Sum each tensor over the ranks, in place, in one collective (one flat buffer)."""
    if not is_distributed() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


@_disable
def broadcast_(*tensors: torch.Tensor) -> None:
    """Overwrite each tensor with rank 0's, in place, in one collective (one flat float buffer;
    the tensors are the codebook state: floats, and the 0/1 ``initted`` flag)."""
    if not is_distributed() or not tensors:
        return
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
    dist.broadcast(flat, src=0)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t).to(t.dtype))
        offset += t.numel()


@_disable
def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank (a decision every rank must share to issue the same
    collectives next)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


@_disable
def gather_rows(rows: torch.Tensor) -> torch.Tensor | None:
    """The rows (C, M_r, d) of every rank r, concatenated along M in rank order, on rank 0
    (None elsewhere). Ranks may hold different M_r, 0 included: the counts are exchanged first
    and the rows padded to the largest."""
    if not is_distributed():
        return rows
    world, device = dist.get_world_size(), rows.device
    count = torch.tensor([rows.shape[1]], dtype=torch.int64, device=device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c.item()) for c in counts]
    longest = max(counts)
    c, m, d = rows.shape
    padded = rows.new_zeros(c, longest, d)
    padded[:, :m] = rows
    padded = padded.contiguous()
    if dist.get_rank() != 0:
        dist.gather(padded, None, dst=0)
        return None
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.gather(padded, parts, dst=0)
    return torch.cat([p[:, :n] for p, n in zip(parts, counts)], dim=1)


def average_gradient(grad: torch.Tensor) -> torch.Tensor:
    """A tensor hook: the mean of ``grad`` over the ranks (identity outside a process group).
    Inside ``DistributedDataParallel`` the parameter is averaged again by DDP, which leaves the
    (already equal) mean unchanged."""
    if not is_distributed():
        return grad
    return _all_reduce_mean(grad)


@_disable
def _all_reduce_mean(grad: torch.Tensor) -> torch.Tensor:
    out = grad.contiguous().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()
