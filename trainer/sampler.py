"""P×K task batches: every global batch holds K pairs of each of P tasks, so every anchor of the task
InfoNCE has a positive. Deterministic per (seed, epoch), split across ranks, resumable mid-epoch.

Within an epoch each task's pairs are shuffled and drawn without replacement; tasks are chosen in
proportion to the pairs they have left, so the epoch uses the data evenly and ends when fewer than P tasks
still have K pairs.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterator

import numpy as np


class TaskBatchSampler:
    def __init__(self, task_ids: list[int], tasks_per_batch: int, pairs_per_task: int, *, world_size: int = 1,
                 rank: int = 0, seed: int = 0):
        if pairs_per_task < 2:
            raise ValueError("pairs_per_task must be >= 2, or an anchor can have no positive")
        if (tasks_per_batch * pairs_per_task) % world_size:
            raise ValueError(f"global batch {tasks_per_batch}x{pairs_per_task} does not split over {world_size} ranks")
        self.by_task: dict[int, list[int]] = defaultdict(list)
        for index, task in enumerate(task_ids):
            self.by_task[int(task)].append(index)
        usable = [t for t, items in self.by_task.items() if len(items) >= pairs_per_task]
        if len(usable) < tasks_per_batch:
            raise ValueError(f"only {len(usable)} tasks have >= {pairs_per_task} pairs; a batch needs {tasks_per_batch}")
        self.P, self.K, self.world, self.rank, self.seed = tasks_per_batch, pairs_per_task, world_size, rank, seed
        self.epoch, self.step = 0, 0  # the position: next batch to yield

    def global_batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        left = {t: list(rng.permutation(items)) for t, items in sorted(self.by_task.items())}
        batches = []
        while True:
            ready = [t for t, items in left.items() if len(items) >= self.K]
            if len(ready) < self.P:
                return batches
            weights = np.array([len(left[t]) for t in ready], dtype=float)
            chosen = rng.choice(ready, size=self.P, replace=False, p=weights / weights.sum())
            batch = []
            for t in sorted(int(c) for c in chosen):
                batch.extend(int(i) for i in left[t][: self.K])
                left[t] = left[t][self.K:]
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
