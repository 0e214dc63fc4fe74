"""Training over several processes: the launches the trainer takes, FSDP2 sharding, gathering sharded tensors.

Two ways to spread a run over processes, both started with `accelerate launch --multi_gpu` (gloo on CPU, NCCL
on GPUs): DDP (the default; accelerate wraps the transformer) and, with `fsdp: true` in the recipe, FSDP2 as
torchtitan applies it: `fully_shard` on every FLUX block, then on the transformer, so each process holds
1/world of the frozen base, of the adapter and of the optimizer states, and gathers one block at a time.
The trainer shards the model itself rather than through accelerate's FSDP plugin because checkpoints are
distributed checkpoints of the trainable tensors only (trainer/checkpoint.py), the same code for DDP and FSDP,
and because the same path then runs on CPU processes, where the tests exercise it (accelerate's plugin needs
GPUs). DeepSpeed is refused: its engine owns the optimizer and its own checkpoint format; FSDP2 gives what
ZeRO-3 would (sharded base weights, adapter and optimizer states).
"""
from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn


def check_launch(accelerator: Accelerator) -> None:
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ValueError(f"accelerate was launched with {accelerator.distributed_type.value}: launch with "
                         "`accelerate launch --multi_gpu` instead and set `fsdp: true` in the recipe for sharding "
                         "(the trainer applies FSDP2 itself; DeepSpeed is not supported)")


def shard(transformer: nn.Module, others: list[nn.Module], accelerator: Accelerator) -> None:
    """FSDP2 in place: each FLUX block is one unit (gathered for its forward, freed after), the transformer's
    remaining weights (embedders, norms, the adapter's task embedding) the root unit; `others` (a trainable
    AlignNet) become units of their own. Mixed dtypes in a unit (bf16 base, fp32 adapter) are kept as stored."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
        fully_shard(block, mesh=mesh)
    for module in [transformer, *others]:
        fully_shard(module, mesh=mesh)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor, gathered from every process if it is sharded (then every process must call this)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t
