"""The training objectives: flow matching, and the task InfoNCE on one process and across two (gloo)."""
from __future__ import annotations

import os
import socket
from datetime import timedelta

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from trainer.losses import flow_matching_loss, sample_sigmas, task_infonce, task_infonce_reference  # noqa: E402

BLOCKS, B, T, D = 3, 8, 5, 12


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(B, T, D, generator=g) for _ in range(BLOCKS)]
    tasks = torch.tensor([1, 1, 3, 3, 5, 5, 1, 3])  # every anchor has a positive
    return feats, tasks


def test_flow_matching_targets_the_velocity():
    x0, noise = torch.randn(4, 16, 8), torch.randn(4, 16, 8)
    assert flow_matching_loss(noise - x0, x0, noise).item() == 0.0
    assert abs(flow_matching_loss(noise - x0 + 1, x0, noise).item() - 1.0) < 1e-6
    sig = sample_sigmas(10_000, "logit_normal", torch.Generator().manual_seed(0))
    assert 0 < sig.min() and sig.max() < 1 and abs(sig.mean().item() - 0.5) < 0.02
    with pytest.raises(ValueError, match="unknown timestep scheme"):
        sample_sigmas(2, "cosine")


def test_infonce_matches_the_direct_formula_in_value_and_gradient():
    feats, tasks = _batch()
    a = [f.clone().requires_grad_(True) for f in feats]
    b = [f.clone().requires_grad_(True) for f in feats]
    la, lb = task_infonce(a, tasks), task_infonce_reference(b, tasks)
    assert torch.allclose(la, lb, atol=1e-5)
    la.backward(), lb.backward()
    for x, y in zip(a, b):
        assert torch.allclose(x.grad, y.grad, atol=1e-6)


def test_anchors_without_a_positive_are_left_out():
    feats, _ = _batch()
    alone = torch.tensor([1, 1, 2, 3, 3, 4, 5, 5])  # tasks 2 and 4 have no partner
    keep = torch.tensor([0, 1, 3, 4, 6, 7])
    sub = [f[keep] for f in feats]
    assert torch.allclose(task_infonce(feats, alone), task_infonce_reference(feats, alone))
    assert task_infonce([f[:2] for f in feats], torch.tensor([1, 2])).item() == 0.0
    assert task_infonce(sub, alone[keep]).shape == ()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, port: int, tasks: torch.Tensor, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A process that skipped a collective makes the other wait: fail within a minute instead of hanging.
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        feats, _ = _batch()
        half = slice(rank * B // 2, (rank + 1) * B // 2)
        local = [f[half].clone().requires_grad_(True) for f in feats]
        loss = task_infonce(local, tasks[half])
        loss.backward()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        out[rank] = (mean.item() / 2, [x.grad / 2 for x in local])  # DDP averages gradients over ranks
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes
@pytest.mark.parametrize("tasks", [
    torch.tensor([1, 1, 3, 3, 5, 5, 1, 3]),  # every anchor has a positive
    torch.tensor([1, 2, 3, 4, 5, 5, 6, 6]),  # process 0's samples have none: it still joins every exchange
], ids=["all-positive", "one-process-without-positives"])
def test_two_processes_give_the_single_process_loss_and_gradients(tasks):
    feats, _ = _batch()
    full = [f.clone().requires_grad_(True) for f in feats]
    expected = task_infonce_reference(full, tasks)
    expected.backward()
    out = mp.Manager().dict()
    mp.spawn(_rank_worker, args=(_port(), tasks, out), nprocs=2)
    for rank in (0, 1):
        loss, grads = out[rank]
        assert abs(loss - expected.item()) < 1e-5
        half = slice(rank * B // 2, (rank + 1) * B // 2)
        for g, f in zip(grads, full):
            assert torch.allclose(g, f.grad[half], atol=1e-6)


def test_bf16_autocast_leaves_the_loss_and_its_gradient_in_fp32():
    """Near-identical features (the regime of a collapsing representation): d_ij is a small difference of
    numbers near 2, which bf16's 8-bit mantissa cannot resolve."""
    g = torch.Generator().manual_seed(0)
    common = torch.randn(1, T, D, generator=g)
    feats = [common + 0.01 * torch.randn(B, T, D, generator=g) for _ in range(BLOCKS)]
    z = torch.nn.functional.normalize(feats[0].flatten(1), dim=1)
    assert 0.9998 < (z @ z.T).mean().item() < 0.99995
    _, tasks = _batch()

    def loss_and_grads(autocast: bool):
        x = [f.clone().requires_grad_(True) for f in feats]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = task_infonce(x, tasks)
        loss.backward()
        return loss, torch.cat([t.grad.flatten() for t in x])

    (loss32, grad32), (loss16, grad16) = loss_and_grads(False), loss_and_grads(True)
    assert loss16.dtype == torch.float32
    assert abs(loss16.item() - loss32.item()) <= 1e-3 * abs(loss32.item())
    assert (grad16 - grad32).norm() <= 1e-3 * grad32.norm()
