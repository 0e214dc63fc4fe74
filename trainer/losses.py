"""Training objectives: flow matching + λ · task-aware InfoNCE (X2Edit, paper eqs. (6)–(9)).

Flow matching (reference-code.md §3.6): x_t = (1 − σ)·x0 + σ·ε, the model predicts the velocity ε − x0,
loss = per-sample MSE averaged over the batch. σ ~ U(0, 1) ("none" weighting, the reference) or
sigmoid(N(0, 1)) (logit-normal, SD3).

Task InfoNCE (§3.7): for each of the 19 double blocks, the image-stream output of each sample is flattened
and L2-normalised to z_i. With d_ij = ‖z_i − z_j‖² / τ (τ = 0.5) and positives P_ij = [task_i = task_j, i ≠ j]:

    L_i = −log( Σ_j P_ij e^{−d_ij} / Σ_j e^{−d_ij} )          (the denominator includes j = i)

averaged over anchors, then over blocks, times λ = 0.2. Two deliberate differences from the reference:
  - An anchor with no positive in the global batch is left out of the mean (the reference adds 1e−8 to
    the numerator, which gives such an anchor a huge constant loss that only pushes it away from every
    other sample); the P×K batch sampler (trainer/sampler.py) guarantees every anchor a positive anyway.
  - Across processes the global batch is exact and moves far less data. Since the z are unit vectors,
    d_ij = (2 − 2 z_i·z_j)/τ needs only the Gram matrix G = Z Zᵀ of the global batch. Each rank sends
    slices of its features to the others (all-to-all: every rank then holds a 1/R slice of the feature
    dimension for all samples), computes that slice's partial Gram and the ranks all-reduce it: B_g²
    numbers instead of the reference's all-gather of every feature to every rank, an R-fold saving. The
    collectives are differentiable, so gradients reach every sample's features, and with DDP's gradient
    averaging the result is the gradient of the global-batch loss, as on one process.

The loss is computed in fp32 whatever the autocast state, as the reference's distances are: under bf16,
2 − 2 z_i·z_j of near-identical features is mostly rounding error.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def sample_sigmas(batch: int, scheme: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """σ in (0, 1) per sample: "uniform" (the reference) or "logit_normal" (SD3)."""
    if scheme == "uniform":
        return torch.rand(batch, generator=generator)
    if scheme == "logit_normal":
        return torch.sigmoid(torch.randn(batch, generator=generator))
    raise ValueError(f"unknown timestep scheme {scheme!r} (uniform, logit_normal)")


def flow_matching_loss(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """MSE against the velocity target noise − x0, per sample then over the batch."""
    target = noise - x0
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return per_sample.mean()


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward is again a sum over ranks: every rank's loss depends on the summed
    tensor, so each rank's gradient receives the contributions of all of them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _global_gram(z_BF: torch.Tensor) -> torch.Tensor:
    """Gram matrix of the global batch (B_g, B_g), differentiable, from the local unit vectors (B, F)."""
    _, world = _rank_and_world()
    if world == 1:
        return z_BF @ z_BF.T
    from torch.distributed.nn.functional import all_to_all

    pad = (-z_BF.shape[1]) % world  # equal feature slices; zero padding leaves dot products unchanged
    chunks = list(F.pad(z_BF, (0, pad)).chunk(world, dim=1))  # chunk r goes to rank r
    received = all_to_all([torch.empty_like(c) for c in chunks], chunks)  # all ranks' samples, my slice
    z_slice = torch.cat(received, dim=0)  # (B_g, F_padded / R), rank-major sample order
    return _AllReduceSum.apply(z_slice @ z_slice.T)


def _gather_tasks(task_B: torch.Tensor) -> torch.Tensor:
    _, world = _rank_and_world()
    if world == 1:
        return task_B
    out = [torch.empty_like(task_B) for _ in range(world)]
    dist.all_gather(out, task_B)
    return torch.cat(out)


def task_infonce(features: list[torch.Tensor], task_B: torch.Tensor, tau: float = 0.5) -> torch.Tensor:
    """The global batch's loss: over blocks, the mean of L_i over the anchors that have a positive; in fp32.

    features: per block, the image-stream output (B, T, D) of this rank's samples; task_B: task ids (B,).
    Every rank must hold the same local batch size (DDP's batches do). Each rank returns its anchors' sum
    over the global count, times the world size: averaged over ranks (DDP's gradients, the logged loss) that
    is the global-batch loss, however the anchors with a positive are spread over the ranks."""
    with torch.autocast(features[0].device.type, enabled=False):  # fp32: see the module's docstring
        rank, world = _rank_and_world()
        tasks_G = _gather_tasks(task_B)
        local = slice(rank * task_B.shape[0], (rank + 1) * task_B.shape[0])
        positive_GG = (tasks_G[:, None] == tasks_G[None, :]).fill_diagonal_(False)
        has_positive_G = positive_GG.any(dim=1)
        anchors_B = has_positive_G[local]
        positive_AG = positive_GG[local][anchors_B]
        losses = []
        # Every rank runs every exchange, even with no anchor of its own (its share is then an empty sum
        # that still carries the exchanges' backward): a rank that skipped one would hang the others.
        for h_BTD in features:
            z_BF = F.normalize(h_BTD.float().flatten(1), dim=1)
            logits_AG = -(2 - 2 * _global_gram(z_BF)[local][anchors_B]) / tau  # −d_ij
            log_denominator_A = torch.logsumexp(logits_AG, dim=1)
            log_numerator_A = torch.logsumexp(logits_AG.masked_fill(~positive_AG, float("-inf")), dim=1)
            losses.append((log_denominator_A - log_numerator_A).sum())
        return torch.stack(losses).mean() * world / has_positive_G.sum().clamp(min=1)


def task_infonce_reference(features: list[torch.Tensor], task_B: torch.Tensor, tau: float = 0.5) -> torch.Tensor:
    """The same loss on one process, written the direct way (cdist, explicit exp/sum) to test against."""
    losses = []
    for h_BTD in features:
        z = F.normalize(h_BTD.float().flatten(1), dim=1)
        d = torch.cdist(z, z).pow(2) / tau
        positive = (task_B[:, None] == task_B[None, :]) & ~torch.eye(len(task_B), dtype=torch.bool)
        keep = positive.any(dim=1)
        ratio = (positive * torch.exp(-d)).sum(1) / torch.exp(-d).sum(1)
        losses.append(-torch.log(ratio[keep]).mean())
    return torch.stack(losses).mean()
