"""Every rank / reduce helper in one place, and the two rules that tie rows to ranks.

    from rlopt import ranks
    total = ranks.reduce_sum(local_count)        # identity on one process
    rank, world = ranks.rank_world()
    plan = ranks.minibatch_plan(n, micro, gen, num_minibatches=4, group_size=8)

**Dealing rule** (``ResumableSampler`` in data.py): each rollout step, one permutation of the
prompts (a function of seed and epoch only) is dealt round-robin: rank ``r`` of ``W`` takes
global prompts ``r, r + W, r + 2W, ...``. With ``G`` samples per prompt, local row ``j`` of rank
``r`` is therefore global prompt ``(j // G) * W + r``, sample ``j % G``.

**Minibatch rule** (``minibatch_plan``, built on the dealing rule): the minibatches are those a
single process holding the whole rollout batch would form, so updates do not depend on the
number of ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    """``(global rank, world size)``; ``(0, 1)`` without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if initialized() else (0, 1)


def world_size() -> int:
    return rank_world()[1]


def is_global_zero() -> bool:
    return rank_world()[0] == 0


def _reduce(t: Tensor, op: "dist.ReduceOp") -> Tensor:
    if initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=op)
    return t


def reduce_sum(t: Tensor) -> Tensor:
    """Sum over ranks (a copy; the input is untouched). Identity on one process."""
    return _reduce(t, dist.ReduceOp.SUM)


def reduce_max(t: Tensor) -> Tensor:
    return _reduce(t, dist.ReduceOp.MAX)


def reduce_min(t: Tensor) -> Tensor:
    return _reduce(t, dist.ReduceOp.MIN)


def gather_cat(t: Tensor) -> Tensor:
    """Concatenate a 1-D tensor over ranks (sizes may differ), in rank order."""
    if not (initialized() and dist.get_world_size() > 1):
        return t
    world = dist.get_world_size()
    n = torch.tensor([t.numel()], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    top = int(max(int(s) for s in sizes))
    padded = torch.zeros(top, dtype=t.dtype, device=t.device)
    padded[: t.numel()] = t
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)])


def minibatch_plan(n: int, micro: int, gen: torch.Generator, num_minibatches: int, group_size: int,
                   rank: int = 0, world: int = 1, whole_groups: bool = False) -> list[tuple[Tensor, int]]:
    """This rank's rows of each minibatch and the number of forward/backward passes every rank
    makes for it (the most any rank needs with ``micro`` rows a pass).

    ``n`` rows on each of ``world`` ranks. One permutation of the *global* row index (drawn
    identically on every rank from ``gen``) is cut into ``num_minibatches`` pieces, exactly as one
    process holding all ``n * world`` rows would; local row ``j`` is global row
    ``((j // G) * world + rank) * G + j % G`` (the dealing rule above). A rank may hold more rows of
    a minibatch than another; the others then make zero-weight passes so that DDP's and FSDP's
    collectives line up. With one minibatch the rows stay in order and ``gen`` is not used.
    ``whole_groups``: the permutation moves whole groups (G contiguous rows of one prompt), so each
    minibatch holds whole groups (aggregations normalised per prompt need them)."""
    m, w, g = num_minibatches, world, group_size
    if m == 1:
        return [(torch.arange(n), -(-n // micro))]
    total = n * w
    if whole_groups:
        groups = torch.randperm(total // g, generator=gen)  # [W*n/G] global groups in update order
        perm = (groups[:, None] * g + torch.arange(g)).reshape(-1)  # [W*n] their rows, in order
    else:
        perm = torch.randperm(total, generator=gen)  # [W*n] global rows in update order
    place = torch.empty_like(perm)
    place[perm] = torch.arange(total)  # [W*n] position of each global row in perm
    j = torch.arange(n)
    mine = place[((j // g) * w + rank) * g + j % g]  # [n] positions of this rank's rows
    order = torch.argsort(mine)
    # minibatch k is perm[bounds[k]:bounds[k+1]]: equal pieces when m divides the rows (groups), else
    # as equal as possible, so no row is ever left out (dynamic sampling may shorten a batch)
    unit = g if whole_groups else 1
    bounds = [(k * (total // unit)) // m * unit for k in range(m + 1)]
    owner = (perm // g) % w  # [W*n] rank holding each row of perm
    out = []
    for k in range(m):
        lo, hi = bounds[k], bounds[k + 1]
        rows = order[(mine[order] >= lo) & (mine[order] < hi)]
        counts = torch.bincount(owner[lo:hi], minlength=w)  # [W] rows per rank
        out.append((rows, int((-(-counts // micro)).max())))
    return out


def mix_seed(*xs: int) -> int:
    """A 63-bit seed from integers (splitmix-style), stable across runs and platforms: the sampling
    noise of a rollout step is ``mix_seed(seed, step, rank)``, so a resumed run repeats exactly."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = ((h ^ (int(x) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF
