"""P×K task batches: every global batch holds K pairs of each of P distinct tasks, so every anchor of the task
InfoNCE has a positive. Deterministic per (seed, epoch), split across ranks, resumable mid-epoch.

Coverage: an epoch draws every drawable pair at least once. Each task's pairs are drawn in a shuffled order;
a task that runs out is reshuffled and drawn again (it cycles), so a pair comes back only after every other
pair of its task has been drawn. Tasks are chosen in proportion to the pairs they have not drawn yet this
epoch; when fewer than P tasks have any left, the other places go to spent tasks, chosen in proportion to
their size. The epoch ends once every drawable pair has been drawn. A batch needs P distinct tasks, so the
largest task sets the epoch's length and smaller ones are drawn more often: on tasks of 60/25/11/6/3 pairs
with P = 3, K = 2 an epoch is about 30 batches, the 60 pairs are drawn about once each, the others 2–4 times
on average.

With `groups` (the aspect bucket of each pair) a batch is drawn from one group only, so its images share a
size; groups are chosen in proportion to the pairs they have not drawn yet. A pair is not drawable when its
task has fewer than K pairs in its group, or its group fewer than P such tasks: the sampler warns, naming
them, when it is built. `epoch_report` gives each task's draws in an epoch (the trainer logs it).
"""
from __future__ import annotations

import warnings
from collections import Counter, defaultdict
from typing import Iterator

import numpy as np

from manifests.taxonomy import TASKS


def _name(task: int) -> str:
    return f"{TASKS[task].name} (task {task})"


class _Cycle:
    """One task's pairs in one group, K at a time in a shuffled order, reshuffled whenever they run out."""

    def __init__(self, items: list[int], rng: np.random.Generator):
        self.items, self.rng = items, rng
        self.queue = [int(i) for i in rng.permutation(items)]
        self.drawn = 0

    def undrawn(self) -> int:
        return max(0, len(self.items) - self.drawn)

    def take(self, k: int) -> list[int]:
        if len(self.queue) < k:
            # The next round ends with the pairs still left of this one: no pair twice in one batch, and each
            # round is a permutation of the task's pairs.
            left = set(self.queue)
            self.queue += [int(i) for i in self.rng.permutation(self.items) if i not in left] + self.queue
        taken, self.queue = self.queue[:k], self.queue[k:]
        self.drawn += k
        return taken


class TaskBatchSampler:
    def __init__(self, task_ids: list[int], tasks_per_batch: int, pairs_per_task: int, *, world_size: int = 1,
                 rank: int = 0, seed: int = 0, groups: list | None = None):
        if pairs_per_task < 2:
            raise ValueError("pairs_per_task must be >= 2, or an anchor can have no positive")
        if (tasks_per_batch * pairs_per_task) % world_size:
            raise ValueError(f"global batch {tasks_per_batch}x{pairs_per_task} does not split over {world_size} ranks")
        self.P, self.K, self.world, self.rank, self.seed = tasks_per_batch, pairs_per_task, world_size, rank, seed
        self.task_ids = [int(t) for t in task_ids]
        by_group: dict[object, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
        for index, (task, group) in enumerate(zip(self.task_ids, [0] * len(task_ids) if groups is None else groups)):
            by_group[group][task].append(index)
        ordered = sorted(by_group.items(), key=lambda kv: str(kv[0]))
        # Only what can fill a batch: tasks with K pairs, in groups with P such tasks.
        ready = [(g, {t: items for t, items in sorted(tasks.items()) if len(items) >= self.K}) for g, tasks in ordered]
        self.by_group = {g: tasks for g, tasks in ready if len(tasks) >= self.P}
        if not self.by_group:
            usable = max(len(tasks) for _, tasks in ready)
            raise ValueError(f"only {usable} tasks have >= {pairs_per_task} pairs (in one group); "
                             f"a batch needs {tasks_per_batch}")
        self._warn_undrawable(ordered, grouped=groups is not None)
        self.epoch, self.step = 0, 0  # the position: next batch to yield
        self._lengths: dict[int, int] = {}

    def _warn_undrawable(self, ordered: list, grouped: bool) -> None:
        lines = []
        for group, tasks in ordered:
            if group not in self.by_group:  # only with buckets: without, the sampler refused to start
                names = ", ".join(_name(t) for t in tasks)
                lines.append(f"bucket {group}: {sum(map(len, tasks.values()))} pairs of {names}; fewer than "
                             f"{self.P} of these tasks have {self.K} pairs there")
                continue
            where = f" in bucket {group}" if grouped else ""
            lines += [f"{_name(t)}{where}: {len(items)} pair(s), fewer than {self.K}"
                      for t, items in tasks.items() if len(items) < self.K]
        if lines:
            warnings.warn("the task batch sampler never draws these pairs (a batch is "
                          f"{self.P} tasks × {self.K} pairs):\n  " + "\n  ".join(lines), stacklevel=3)

    def global_batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        cycles = {g: {t: _Cycle(items, rng) for t, items in tasks.items()} for g, tasks in self.by_group.items()}
        batches = []
        while True:
            left = {g: sum(c.undrawn() for c in tasks.values()) for g, tasks in cycles.items()}
            open_groups = [g for g in cycles if left[g] > 0]
            if not open_groups:
                return batches
            sizes = np.array([left[g] for g in open_groups], dtype=float)
            group = open_groups[rng.choice(len(open_groups), p=sizes / sizes.sum())]
            batches.append(self._batch(cycles[group], rng))

    def _batch(self, cycles: dict[int, _Cycle], rng: np.random.Generator) -> list[int]:
        tasks = list(cycles)
        undrawn = np.array([cycles[t].undrawn() for t in tasks], dtype=float)
        fresh = min(self.P, int((undrawn > 0).sum()))
        chosen = [int(i) for i in rng.choice(len(tasks), size=fresh, replace=False, p=undrawn / undrawn.sum())]
        if fresh < self.P:  # every task with pairs left is in; the rest of the batch cycles
            spent = [i for i in range(len(tasks)) if i not in chosen]
            sizes = np.array([len(cycles[tasks[i]].items) for i in spent], dtype=float)
            chosen += [int(i) for i in rng.choice(spent, size=self.P - fresh, replace=False, p=sizes / sizes.sum())]
        return [i for t in sorted(tasks[c] for c in chosen) for i in cycles[t].take(self.K)]

    def epoch_report(self, epoch: int) -> dict:
        """The epoch's length and, per task name, the pairs it holds and the pairs drawn (with repeats)."""
        batches = self.global_batches(epoch)
        drawn = Counter(self.task_ids[i] for batch in batches for i in batch)
        held = Counter(self.task_ids)
        return {"epoch": epoch, "batches": len(batches),
                "tasks": {TASKS[t].name: {"pairs": held[t], "drawn": drawn[t]} for t in sorted(held)}}

    def locate(self, consumed: int) -> tuple[int, int]:
        """(epoch, batch within it) of the global batch that follows `consumed` ones."""
        epoch = 0
        while consumed >= (n := self._length(epoch)):
            epoch, consumed = epoch + 1, consumed - n
        return epoch, consumed

    def _length(self, epoch: int) -> int:
        if epoch not in self._lengths:
            self._lengths[epoch] = len(self.global_batches(epoch))
        return self._lengths[epoch]

    def __iter__(self) -> Iterator[list[int]]:
        """This rank's share of each global batch, from the saved position on, epoch after epoch."""
        while True:
            batches = self.global_batches(self.epoch)
            per_rank = self.P * self.K // self.world
            while self.step < len(batches):
                batch = batches[self.step]
                self.step += 1
                yield batch[self.rank * per_rank:(self.rank + 1) * per_rank]
            self.epoch, self.step = self.epoch + 1, 0

    def seek(self, consumed: int) -> None:
        """Position the sampler after `consumed` global batches (what a resumed run has already trained on)."""
        self.epoch, self.step = self.locate(consumed)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"sampler state has seed {state['seed']}, this sampler {self.seed}")
        self.epoch, self.step = state["epoch"], state["step"]
