"""Held-out validation: the flow-matching loss per task on pairs kept out of training (anchors-trainer.md §7a).

Every validation sees the same pairs, VAE samples and noise (generators seeded per pair) at the same σ grid,
so successive values differ only by what the adapter learned: a low-variance curve that needs no sampler.
Nothing here draws from the global RNG, so validating leaves training as it was (resumes stay bit-exact).
Process r takes pairs r, r + world, ...; all processes run the same number of forwards (the last round is
padded with a repeat that is not counted), as the collectives inside DDP and FSDP forwards need.
"""
from __future__ import annotations

import hashlib
import math
from collections import defaultdict

import torch
import torch.distributed as dist

from manifests.taxonomy import NUM_TASK_IDS, TASKS
from trainer.config import ValidationConfig
from trainer.data import PairDataset, PairRef
from trainer.losses import flow_matching_loss


def hold_out(pairs: list[PairRef], per_task: int, keep: int) -> tuple[list[PairRef], list[PairRef]]:
    """(training pairs, held-out pairs): `per_task` pairs of every task that still keeps `keep` for training
    (the sampler's K), chosen by a hash of the pair key, so the choice survives adding or reordering shards."""
    by_task: dict[int, list[PairRef]] = defaultdict(list)
    for pair in pairs:
        by_task[pair.task_id].append(pair)
    held = set()
    for items in by_task.values():
        if len(items) - per_task >= keep:
            ranked = sorted(items, key=lambda p: (hashlib.sha1(p.key.encode()).hexdigest(), p.shard))
            held.update((p.shard, p.key) for p in ranked[:per_task])
    return ([p for p in pairs if (p.shard, p.key) not in held],
            [p for p in pairs if (p.shard, p.key) in held])


@torch.no_grad()
def validate(model, adapter, held: PairDataset, config: ValidationConfig, guidance: float,
             accelerator) -> dict[str, float]:
    """Mean flow-matching loss over the σ grid and the held-out pairs, per task name (collective)."""
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    sums = torch.zeros(NUM_TASK_IDS, dtype=torch.float64, device=device)
    counts = torch.zeros_like(sums)
    for round_ in range(math.ceil(len(held) / world)):
        index = round_ * world + rank
        counted = index < len(held)
        item = held[index if counted else 0]
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + index)
        target = model.encode_images(torch.from_numpy(item["target"])[None], generator)
        reference = model.encode_images(torch.from_numpy(item["source"])[None], generator)
        text = model.encode_text([item["instruction"]])
        losses = []
        with adapter.task(torch.tensor([item["task_id"]], device=device)), accelerator.autocast():
            for sigma in config.sigmas:
                noise = torch.randn(target.shape, generator=generator).to(device, target.dtype)
                noisy = (1 - sigma) * target + sigma * noise
                pred = model.predict(noisy, reference, text, torch.full((1,), sigma, device=device), guidance)
                losses.append(flow_matching_loss(pred, target, noise))
        if counted:
            sums[item["task_id"]] += torch.stack(losses).mean().double()
            counts[item["task_id"]] += 1
    if world > 1:
        dist.all_reduce(sums)
        dist.all_reduce(counts)
    return {TASKS[t].name: (sums[t] / counts[t]).item() for t in range(NUM_TASK_IDS) if counts[t] > 0}
