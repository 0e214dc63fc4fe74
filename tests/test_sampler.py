"""The P×K task batch sampler."""
from __future__ import annotations

import itertools
from collections import Counter

import pytest

from trainer.sampler import TaskBatchSampler

TASKS = [1] * 9 + [3] * 7 + [5] * 6 + [11] * 2 + [12] * 1
# The lone task-12 pair is warned about whenever one of these is built (tested below).
pytestmark = pytest.mark.filterwarnings("ignore:the task batch sampler never draws:UserWarning")
UNEVEN = {1: 60, 3: 25, 5: 11, 11: 6, 12: 3, 2: 1}  # pairs per task


def _check_epoch(batches: list[list[int]], tasks: list[int], p: int, k: int) -> Counter:
    """Every batch: p distinct tasks × k distinct pairs. Per task, each run of as many draws as it has pairs
    is a permutation of them (a pair comes back only after all the others). Returns the draws per pair."""
    order: dict[int, list[int]] = {}
    for batch in batches:
        counts = Counter(tasks[i] for i in batch)
        assert len(batch) == p * k == len(set(batch)) and len(counts) == p and set(counts.values()) == {k}
        for i in batch:
            order.setdefault(tasks[i], []).append(i)
    size = Counter(tasks)
    for task, draws in order.items():
        rounds = [draws[r:r + size[task]] for r in range(0, len(draws), size[task])]
        assert all(len(set(r)) == len(r) for r in rounds)
    return Counter(i for batch in batches for i in batch)


def test_every_global_batch_has_p_tasks_of_k_pairs_and_ranks_split_it():
    ranks = [TaskBatchSampler(TASKS, 2, 2, world_size=2, rank=r, seed=3) for r in (0, 1)]
    batches = ranks[0].global_batches(0)
    assert set(_check_epoch(batches, TASKS, 2, 2)) == set(range(len(TASKS) - 1))  # all but the lone task-12 pair
    for step, (a, b) in enumerate(zip(*(itertools.islice(iter(s), len(batches)) for s in ranks))):
        assert a + b == batches[step]


def test_position_resumes_exactly():
    first = TaskBatchSampler(TASKS, 2, 2, seed=1)
    it = iter(first)
    head = [next(it) for _ in range(5)]
    state = first.state_dict()
    rest = [next(it) for _ in range(5)]  # crosses into the second epoch (7 batches each)
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


def test_an_epoch_draws_every_pair_of_an_uneven_index_and_names_what_it_cannot():
    tasks = [t for t, n in UNEVEN.items() for _ in range(n)]
    with pytest.warns(UserWarning, match=r"subject_addition \(task 2\): 1 pair\(s\), fewer than 2") as record:
        sampler = TaskBatchSampler(tasks, 3, 2, seed=7)
    assert len(record) == 1 and "camera_movement" not in str(record[0].message)  # 3 pairs: enough for K = 2
    for epoch in (0, 1):
        batches = sampler.global_batches(epoch)
        drawn = _check_epoch(batches, tasks, 3, 2)
        assert {i for i, t in enumerate(tasks) if t != 2} == set(drawn)  # all 105 drawable pairs, the lone one never
        assert len(batches) <= 32  # the 60-pair task (30 batches' worth) is in nearly every batch
        report = sampler.epoch_report(epoch)
        assert report["epoch"] == epoch and report["batches"] == len(batches)
        assert report["tasks"]["subject_addition"] == {"pairs": 1, "drawn": 0}
        assert {name: v["pairs"] for name, v in report["tasks"].items()} == {
            "subject_removal": 60, "subject_addition": 1, "style_change": 25, "color_change": 11,
            "tone_transformation": 6, "camera_movement": 3}
        assert sum(v["drawn"] for v in report["tasks"].values()) == 6 * len(batches)
        assert report["tasks"]["subject_removal"]["drawn"] >= 60


def test_a_bucket_that_cannot_fill_a_batch_is_named_and_the_others_are_drawn_in_full():
    tasks = [1] * 4 + [3] * 4 + [5] * 2 + [1] * 3 + [3] * 1
    groups = [(512, 512)] * 10 + [(720, 1456)] * 4  # the wide bucket holds one task with K pairs
    with pytest.warns(UserWarning, match=r"bucket \(720, 1456\): 4 pairs of subject_removal \(task 1\), "
                                         r"style_change \(task 3\); fewer than 2 of these tasks have 2 pairs"):
        sampler = TaskBatchSampler(tasks, 2, 2, seed=0, groups=groups)
    drawn = _check_epoch(sampler.global_batches(0), tasks, 2, 2)
    assert set(drawn) == set(range(10))
