"""The P×K task batch sampler."""
from __future__ import annotations

import itertools
from collections import Counter

import pytest

from trainer.sampler import TaskBatchSampler

TASKS = [1] * 9 + [3] * 7 + [5] * 6 + [11] * 2 + [12] * 1


def test_every_global_batch_has_p_tasks_of_k_pairs_and_ranks_split_it():
    ranks = [TaskBatchSampler(TASKS, 2, 2, world_size=2, rank=r, seed=3) for r in (0, 1)]
    batches = ranks[0].global_batches(0)
    assert len(batches) >= 5
    seen = set()
    for batch in batches:
        counts = Counter(TASKS[i] for i in batch)
        assert len(counts) == 2 and set(counts.values()) == {2}
        assert not seen & set(batch)  # without replacement within an epoch
        seen |= set(batch)
    for step, (a, b) in enumerate(zip(*(itertools.islice(iter(s), len(batches)) for s in ranks))):
        assert a + b == batches[step]


def test_position_resumes_exactly():
    first = TaskBatchSampler(TASKS, 2, 2, seed=1)
    it = iter(first)
    head = [next(it) for _ in range(7)]  # crosses into the second epoch
    state = first.state_dict()
    rest = [next(it) for _ in range(5)]
    again = TaskBatchSampler(TASKS, 2, 2, seed=1)
    again.load_state_dict(state)
    assert [next(iter(again)) for _ in range(1)] == rest[:1]
    resumed = iter(again)
    assert [next(resumed) for _ in range(4)] == rest[1:]
    assert head != rest and TaskBatchSampler(TASKS, 2, 2, seed=2).global_batches(0) != first.global_batches(0)


def test_impossible_configurations_are_refused():
    with pytest.raises(ValueError, match="no positive"):
        TaskBatchSampler(TASKS, 2, 1)
    with pytest.raises(ValueError, match="only 4 tasks"):
        TaskBatchSampler(TASKS, 5, 2)
    with pytest.raises(ValueError, match="does not split"):
        TaskBatchSampler(TASKS, 3, 2, world_size=4)


def test_seek_lands_where_the_iteration_would_be():
    walked = TaskBatchSampler(TASKS, 2, 2, seed=4)
    it = iter(walked)
    for _ in range(9):
        next(it)
    sought = TaskBatchSampler(TASKS, 2, 2, seed=4)
    sought.seek(9)
    assert sought.state_dict() == walked.state_dict()
    assert next(iter(sought)) == next(it)


def test_groups_keep_each_batch_within_one_aspect_bucket():
    groups = [("wide" if i % 2 else "square") for i in range(len(TASKS))]
    sampler = TaskBatchSampler(TASKS, 2, 2, seed=5, groups=groups)
    batches = sampler.global_batches(0)
    assert batches and all(len({groups[i] for i in b}) == 1 for b in batches)
    assert {groups[b[0]] for b in batches} == {"wide", "square"}
