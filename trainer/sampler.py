"""P×K task batches: every global batch holds K pairs of each of P tasks, so every anchor of the task
InfoNCE has a positive. Deterministic per (seed, epoch), split across ranks, resumable mid-epoch.

Within an epoch each task's pairs are shuffled and drawn without replacement; tasks are chosen in
proportion to the pairs they have left, so the epoch uses the data evenly and ends when fewer than P tasks
still have K pairs. With `groups` (the aspect bucket of each pair) a batch is drawn from one group only,
so its images share a size; groups are chosen in proportion to what they have left.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterator

import numpy as np


class TaskBatchSampler:
    def __init__(self, task_ids: list[int], tasks_per_batch: int, pairs_per_task: int, *, world_size: int = 1,
                 rank: int = 0, seed: int = 0, groups: list | None = None):
        if pairs_per_task < 2:
            raise ValueError("pairs_per_task must be >= 2, or an anchor can have no positive")
        if (tasks_per_batch * pairs_per_task) % world_size:
            raise ValueError(f"global batch {tasks_per_batch}x{pairs_per_task} does not split over {world_size} ranks")
        groups = [0] * len(task_ids) if groups is None else groups
        self.by_group: dict[object, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
        for index, (task, group) in enumerate(zip(task_ids, groups)):
            self.by_group[group][int(task)].append(index)
        usable = max(sum(len(items) >= pairs_per_task for items in tasks.values()) for tasks in self.by_group.values())
        if usable < tasks_per_batch:
            raise ValueError(f"only {usable} tasks have >= {pairs_per_task} pairs (in one group); "
                             f"a batch needs {tasks_per_batch}")
        self.P, self.K, self.world, self.rank, self.seed = tasks_per_batch, pairs_per_task, world_size, rank, seed
        self.epoch, self.step = 0, 0  # the position: next batch to yield

    def global_batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        left = {g: {t: list(rng.permutation(items)) for t, items in sorted(tasks.items())}
                for g, tasks in sorted(self.by_group.items(), key=lambda kv: str(kv[0]))}
        batches = []
        while True:
            ready = {g: [t for t, items in tasks.items() if len(items) >= self.K] for g, tasks in left.items()}
            open_groups = [g for g in left if len(ready[g]) >= self.P]
            if not open_groups:
                return batches
            sizes = np.array([sum(len(v) for v in left[g].values()) for g in open_groups], dtype=float)
            group = open_groups[rng.choice(len(open_groups), p=sizes / sizes.sum())]
            weights = np.array([len(left[group][t]) for t in ready[group]], dtype=float)
            chosen = rng.choice(ready[group], size=self.P, replace=False, p=weights / weights.sum())
            batch = []
            for t in sorted(int(c) for c in chosen):
                batch.extend(int(i) for i in left[group][t][: self.K])
                left[group][t] = left[group][t][self.K:]
            batches.append(batch)

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
        self.epoch, self.step = 0, consumed
        while self.step >= (n := len(self.global_batches(self.epoch))):
            if n == 0:
                raise ValueError("an epoch holds no batch")
            self.epoch, self.step = self.epoch + 1, self.step - n

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"sampler state has seed {state['seed']}, this sampler {self.seed}")
        self.epoch, self.step = state["epoch"], state["step"]
