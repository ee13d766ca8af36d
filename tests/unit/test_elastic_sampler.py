"""ElasticSampler (shoal.torch.elastic): across changes of membership, every sample of an epoch is processed
once, no more (the counts below), whatever the ranks lost; the tail of a dealing is padded only when the
remaining samples do not divide over the ranks, as torch's DistributedSampler does."""

from __future__ import annotations

import collections

from shoal.torch.elastic import ElasticSampler


def _deal(n: int, world: int, state=None):
    samplers = [ElasticSampler(list(range(n)), shuffle=True, seed=5) for _ in range(world)]
    for r, s in enumerate(samplers):
        if state is None:
            s.reset(world, r)
        else:
            s.load_state_dict(state, world, r)
    return samplers


def test_samples_processed_once_across_shrinking_and_growing():
    counts: collections.Counter = collections.Counter()
    # 120 samples on 3 ranks, batch 4: 4 lockstep steps, then rank 2 dies (its 4 batches reached the model).
    ranks = _deal(120, 3)
    for step in range(4):
        for s in ranks:
            counts.update(s.get_indices(step, 4))
            s.record_batch(step, 4)
    # The survivors go on as a world of 2: rank 0's record is all they need (it is what sync broadcasts).
    ranks = _deal(120, 2, ranks[0].state_dict())
    assert sorted(set(range(120)) - set(ranks[0].indices) - set(ranks[1].indices)) == sorted(counts)
    for step in range(3):
        for s in ranks:
            counts.update(s.get_indices(step, 4))
            s.record_batch(step, 4)
    # A replacement joins: a world of 4 (rank 0's record again), to the end of the epoch.
    ranks = _deal(120, 4, ranks[0].state_dict())
    left = len(ranks[0].indices)
    for step in range((left + 3) // 4):
        for s in ranks:
            counts.update(s.get_indices(step, 4))
            s.record_batch(step, 4)
    assert sorted(counts) == list(range(120))
    assert set(counts.values()) == {1}, [i for i, c in counts.items() if c > 1]  # 120 - 48 - 24 = 48 = 4 x 12


def test_restored_record_deals_the_uncommitted_work_again():
    ranks = _deal(40, 2)
    for step in range(2):
        for s in ranks:
            s.record_batch(step, 4)
    committed = ranks[0].state_dict()
    for s in ranks:
        s.record_batch(2, 4)  # a step after the commit, lost with a rank
    survivors = _deal(40, 1, committed)
    assert len(survivors[0].indices) == 40 - 16
