"""Checkpoints that a killed run restarts from exactly: `<out>/checkpoint-<step>/`.

    .metadata, *.distcp   the trainable tensors (adapter, a trained AlignNet) and their optimizer states, as a
                          torch distributed checkpoint: each process writes its own shard under FSDP, one copy
                          is written under DDP
    scheduler.pt          the learning-rate schedule
    rng-<rank>.pt         each process's torch / CUDA / NumPy / Python RNG states

The frozen FLUX weights (24 GB) never change and are not saved. The data position is the step itself (the
sampler seeks to it; global batches do not depend on the number of processes). Resumed on as many processes
as wrote it, a run continues bit-exactly; on another number the tensors are resharded and the run goes on
with the same weights, optimizer state and data order, but fresh noise streams. A checkpoint is written
under a temporary name and renamed once every process has finished, so `checkpoint-<step>` exists only
complete. Read back with weights_only loading.
"""
from __future__ import annotations

import random
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

# Frozen weights stay out (not strict: they are "missing" by design; dcp.load checks every trainable key).
OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


def checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """The complete checkpoints in `out_dir` as (step, path), oldest first."""
    return sorted((int(p.name.split("-", 1)[1]), p) for p in out_dir.glob("checkpoint-*")
                  if p.name.split("-", 1)[1].isdigit())


def latest_checkpoint(out_dir: Path) -> tuple[int, Path] | None:
    return (checkpoints(out_dir) or [None])[-1]


def _tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    model_state, optim_state = get_state_dict(model, optimizer, options=OPTIONS)
    return {"model": model_state, "optim": optim_state}


@contextmanager
def _one_process_is_fine():
    """A single-process run (`make train`) is what DCP warns about on every save and load; nothing is wrong."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, mt, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "python": (version, torch.tensor(mt, dtype=torch.int64), py_gauss)}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, mt, py_gauss = state["python"]
    random.setstate((version, tuple(mt.tolist()), py_gauss))


def save_checkpoint(accelerator: Accelerator, out: Path, step: int, keep: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler) -> Path:
    """Collective: every process calls it. `model` holds every trained module (unwrapped or FSDP-sharded)."""
    final, tmp = out / f"checkpoint-{step}", out / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)  # left by a run killed while writing
    accelerator.wait_for_everyone()
    with _one_process_is_fine():
        dcp.save(_tensors(model, optimizer), checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
    torch.save(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp.rename(final)
        for _, old in checkpoints(out)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler) -> bool:
    """Restore `path` into the given objects; True when every process got its RNG state back (same count)."""
    if not (path / ".metadata").exists():
        raise ValueError(f"{path} is not a checkpoint of this trainer (no .metadata of a torch distributed "
                         "checkpoint): move it away to start afresh")
    state = _tensors(model, optimizer)
    try:
        with _one_process_is_fine():
            dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    except (Exception, dcp.CheckpointException) as e:  # (a BaseException) DCP's text holds each rank's
        reason = str(e).strip().splitlines()[-1]  # traceback; the last line names the key and the shapes
        raise ValueError(f"{path} does not fit this run (another adapter or recipe?): {reason}") from e
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=OPTIONS)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    written = len(list(path.glob("rng-*.pt")))
    if written != accelerator.num_processes:
        accelerator.print(f"{path} was written by {written} processes and resumes on {accelerator.num_processes}: "
                          "same weights, optimizer state and data order, fresh noise streams (not bit-identical "
                          f"to a run that kept {written})")
        return False
    _set_rng_state(torch.load(path / f"rng-{accelerator.process_index}.pt", weights_only=True))
    return True
