"""rlopt.ranks: the minibatch plan (a pure function of the dealing rule) and the reduce helpers
on one process."""

import torch

from rlopt import ranks
from rlopt.ranks import minibatch_plan


def test_minibatches_do_not_depend_on_the_number_of_ranks():
    """The rows of each minibatch over all ranks are those one process with the whole batch takes,
    in the same order, and every rank makes the same number of forward/backward passes."""
    for w, b, g, m, micro, seed in [(2, 2, 4, 2, 3, 0), (4, 3, 2, 3, 2, 1), (3, 2, 2, 4, 1, 2), (2, 1, 4, 4, 8, 3)]:
        n = b * g

        def plan(world, rank, rows):
            return minibatch_plan(rows, micro, torch.Generator().manual_seed(seed), m, g, rank=rank, world=world)

        single = plan(1, 0, n * w)  # global rows in the single process's layout: prompt-major
        per_rank = [plan(w, r, n) for r in range(w)]
        for k, (rows, _) in enumerate(single):
            glob = []
            for r in range(w):
                j = per_rank[r][k][0]
                glob += (((j // g) * w + r) * g + j % g).tolist()  # local -> global row
            assert sorted(glob) == sorted(rows.tolist()), (w, k)
            passes = {per_rank[r][k][1] for r in range(w)}
            assert passes == {max(-(-len(per_rank[r][k][0]) // micro) for r in range(w))}, passes


# --- FSDP2 checkpoint and resume -------------------------------------------------------------------


def test_one_minibatch_keeps_row_order_and_counts_passes():
    [(rows, passes)] = minibatch_plan(10, 4, torch.Generator().manual_seed(0), 1, 2)
    assert rows.tolist() == list(range(10)) and passes == 3  # ceil(10 / 4)


def test_minibatches_partition_the_rows_on_one_process():
    plan = minibatch_plan(12, 12, torch.Generator().manual_seed(3), 3, 4)
    got = sorted(int(r) for rows, _ in plan for r in rows)
    assert got == list(range(12)) and all(len(rows) == 4 for rows, _ in plan)


def test_reduce_helpers_are_the_identity_on_one_process():
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(ranks.reduce_sum(t), t) and torch.equal(ranks.reduce_max(t), t)
    assert torch.equal(ranks.gather_cat(t), t) and ranks.rank_world() == (0, 1) and ranks.is_global_zero()


def test_whole_group_minibatches_hold_complete_groups_on_every_rank():
    g, b, m = 3, 4, 2  # 4 prompts x 3 samples per rank
    for world in (1, 2):
        for rank in range(world):
            plan = minibatch_plan(b * g, 6, torch.Generator().manual_seed(1), m, g, rank, world, whole_groups=True)
            seen = []
            for rows, _ in plan:
                groups = rows // g
                for q in groups.unique():  # every group present is present whole
                    assert int((groups == q).sum()) == g
                seen += rows.tolist()
            assert sorted(seen) == list(range(b * g))
    # one process and two ranks cut the same global groups into the same minibatches
    single = minibatch_plan(2 * b * g, 100, torch.Generator().manual_seed(1), m, g, whole_groups=True)
    per_rank = [minibatch_plan(b * g, 100, torch.Generator().manual_seed(1), m, g, r, 2, whole_groups=True)
                for r in range(2)]
    for k, (rows, _) in enumerate(single):
        glob = sorted(int(((j // g) * 2 + r) * g + j % g) for r in range(2) for j in per_rank[r][k][0])
        assert glob == sorted(rows.tolist())
