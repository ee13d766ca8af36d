"""ElasticSampler (shoal.torch.elastic): across changes of membership, every sample of an epoch is processed
once, no more (the counts below), whatever the ranks lost; the tail of a dealing is padded only when the
remaining samples do not divide over the ranks, as torch's DistributedSampler does."""

from __future__ import annotations

import collections
import random

import pytest

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


# Horovod's contract (horovod/torch/elastic/sampler.py): progress is ``processed_num``, samples of the epoch
# processed by the whole job; ``record_batch`` adds ``batch_size * num_replicas`` per call; ``state_dict`` is
# ``{"epoch", "processed_num"}``; the epoch's order is ``random.Random(seed + epoch)``'s shuffle.

def _horovod_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed + epoch).shuffle(order)
    return order


def test_progress_is_horovods_processed_num():
    ranks = _deal(40, 2)
    assert [s.processed_num for s in ranks] == [0, 0]
    for s in ranks:
        s.record_batch(0, 4)
        s.record_batch(1, 4)
    assert [s.processed_num for s in ranks] == [16, 16]  # 2 batches x 4 samples x 2 ranks
    assert ranks[0].state_dict() == {"epoch": 0, "processed_num": 16}
    ranks[0].set_epoch(1)  # outside a job: dealt over one rank
    assert ranks[0].state_dict() == {"epoch": 1, "processed_num": 0} and len(ranks[0]) == 40


def test_order_and_state_dict_match_horovods():
    # A state taken under Horovod names the same samples here: same order, same meaning of the count.
    sampler = ElasticSampler(list(range(30)), seed=7)
    sampler.load_state_dict({"epoch": 2, "processed_num": 12}, 1, 0)
    assert list(iter(sampler)) == _horovod_order(30, 7, 2)[12:]
    plain = ElasticSampler(list(range(10)), shuffle=False)
    plain.load_state_dict({"epoch": 0, "processed_num": 4}, 2, 1)
    assert list(iter(plain)) == [5, 7, 9]
    with pytest.raises(KeyError, match="processed_num"):
        plain.load_state_dict({"epoch": 0})


def test_batch_numbers_may_count_on_across_a_change_of_membership():
    # Horovod counts calls: a script that numbers its batches from the epoch's start (not from the last
    # dealing) loses no sample when the world changes (before: batches 2 and 3 of the second dealing were
    # taken as its 3rd and 4th, so the third dealing skipped 6 samples).
    seen: list[int] = []
    ranks = _deal(24, 2)
    for b in range(2):
        for s in ranks:
            seen += s.get_indices(b, 3)
            s.record_batch(b, 3)
    (alone,) = _deal(24, 1, ranks[0].state_dict())
    for step, b in enumerate(range(2, 4)):  # the script's numbering goes on: 2, 3
        seen += alone.get_indices(step, 3)
        alone.record_batch(b, 3)
    assert alone.state_dict() == {"epoch": 0, "processed_num": 18}
    ranks = _deal(24, 2, alone.state_dict())
    assert sorted(seen + ranks[0].indices + ranks[1].indices) == list(range(24))
