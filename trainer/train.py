"""Train the task-aware MoE-LoRA on a frozen FLUX.1 transformer.

    python -m trainer.train --recipe trainer/recipes/tiny-cpu.yaml               # CPU, tiny FLUX (make train)
    accelerate launch --multi_gpu --num_processes 8 -m trainer.train --recipe trainer/recipes/flux-dev-gpu.yaml
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m trainer.train --recipe ...  # gloo
    (DDP by default; `fsdp: true` in the recipe shards the model with FSDP2: trainer/distributed.py)

Each step: VAE-encode target and reference, noise the target at σ, predict the velocity with the reference
tokens in the sequence, loss = flow matching + λ · task InfoNCE over the double blocks' image-stream outputs.
A killed run restarted with the same command continues exactly where its last checkpoint left it
(trainer/checkpoint.py). `<out_dir>/train_log.jsonl` has a line per step; an epoch's first step also carries
the epoch's draws per task (trainer/sampler.py). Text conditioning: FLUX's CLIP + T5, or with
`text_encoder: x2i` Qwen2.5-VL + AlignNet (trainer/x2i.py), whose weights are exported as
`alignnet.safetensors` beside the adapter.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from tqdm import tqdm

from trainer.adapter_io import load_adapter, save_adapter
from trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from trainer.config import TrainConfig, load_train_config
from trainer.data import PairDataset, index_shards
from trainer.distributed import check_launch, shard
from trainer.model import EditModel
from trainer.moe_lora import MoELoRAConfig
from trainer.placement import install_moe_lora
from trainer.sampler import TaskBatchSampler
from trainer.validate import hold_out, validate


def collate(items: list[dict]) -> dict:
    return {"source": torch.from_numpy(np.stack([i["source"] for i in items])),
            "target": torch.from_numpy(np.stack([i["target"] for i in items])),
            "instruction": [i["instruction"] for i in items],
            "task_id": torch.tensor([i["task_id"] for i in items]),
            "skipped": [key for i in items for key in i.get("skipped", [])]}  # undecodable pairs replaced


def load_pipeline(cfg: TrainConfig, dtype: torch.dtype):
    from diffusers import FluxPipeline

    if cfg.build_tiny_base:
        from trainer.tiny_flux import build_tiny_flux

        build_tiny_flux(cfg.base)
    # X2I replaces CLIP + T5: not loading them saves T5-XXL's 9.5 GB.
    skip = {"text_encoder": None, "text_encoder_2": None} if cfg.text_encoder == "x2i" else {}
    return FluxPipeline.from_pretrained(cfg.base, dtype=dtype, **skip)


def load_x2i(cfg: TrainConfig, transformer, device: torch.device, dtype: torch.dtype):
    from trainer.x2i import X2ITextEncoder

    x = cfg.x2i
    return X2ITextEncoder(x.mllm, x.alignnet, x.max_length, joint_dim=transformer.config.joint_attention_dim,
                          pooled_dim=transformer.config.pooled_projection_dim, device=device, dtype=dtype,
                          trainable=x.trainable)


def train(cfg: TrainConfig) -> list[dict]:
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    check_launch(accelerator)
    out = Path(cfg.out_dir)
    weight_dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.mixed_precision]
    pipe = load_pipeline(cfg, weight_dtype)
    pipe.to(accelerator.device)
    torch.manual_seed(cfg.seed)  # the adapter's initial weights are the same on every process and every run
    a = cfg.adapter
    config = MoELoRAConfig(rank=a.rank, alpha=a.alpha, num_experts=a.experts, top_k=a.top_k)
    adapter = install_moe_lora(pipe.transformer, config) if cfg.init_adapter is None else \
        load_adapter(pipe.transformer, cfg.init_adapter, expect=config)
    adapter.to(accelerator.device, torch.float32)  # trainable weights stay fp32 under bf16 autocast
    if cfg.gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
    # After the adapter, so a random-init AlignNet draws from the seeded RNG without changing the adapter's init.
    x2i = load_x2i(cfg, pipe.transformer, accelerator.device, weight_dtype) if cfg.text_encoder == "x2i" else None
    trained = [pipe.transformer] + ([x2i.alignnet] if x2i is not None and x2i.trainable else [])
    sharded = cfg.fsdp and accelerator.num_processes > 1
    if sharded:  # before the optimizer is built: it must hold the sharded parameters
        shard(pipe.transformer, trained[1:], accelerator)

    left_out: Counter = Counter()
    pairs, held = index_shards(cfg.data, left_out), []
    if left_out:
        accelerator.print(f"data: {sum(left_out.values())} pairs left out of the index: {dict(left_out)}")
    if cfg.validation is not None:
        pairs, held = hold_out(pairs, cfg.validation.pairs_per_task, keep=cfg.pairs_per_task)
        accelerator.print(f"validation: {len(held)} held-out pairs" if held else
                          "validation: no task has pairs to spare; no validation in this run")
    dataset, held = PairDataset(pairs, cfg.resolution), PairDataset(held, cfg.resolution)
    sampler = TaskBatchSampler(dataset.task_ids(), cfg.tasks_per_batch, cfg.pairs_per_task,
                               world_size=accelerator.num_processes, rank=accelerator.process_index, seed=cfg.seed,
                               groups=dataset.buckets())
    params = [p for module in trained for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (cfg.warmup_steps + 1)))
    # Sharded modules synchronise their own gradients; the others get accelerate's DDP wrappers. The schedule
    # stays unprepared: accelerate's wrapper steps it once per process, but every process shares one batch.
    optimizer = accelerator.prepare_optimizer(optimizer)
    transformer, *forward_alignnet = trained if sharded else [accelerator.prepare_model(m) for m in trained]
    if forward_alignnet:
        x2i.forward_alignnet = forward_alignnet[0]
    model = EditModel(pipe, cfg.reference_layout, cfg.max_sequence_length, forward_module=transformer,
                      text_encoder=x2i, resolution=cfg.resolution)

    # A checkpoint holds the trainable tensors of the trained modules, their optimizer states, the schedule.
    checkpointed = trained[0] if len(trained) == 1 else nn.ModuleDict({"transformer": trained[0],
                                                                        "alignnet": trained[1]})
    state = (checkpointed, optimizer.optimizer, scheduler)
    step, exact = 0, False
    if (found := latest_checkpoint(out)) is not None:
        step, path = found
        exact = load_checkpoint(accelerator, path, *state)
        accelerator.print(f"resumed from {path}")
    if not exact:  # noise and timesteps differ between processes and, after an inexact resume, from step 0's
        torch.manual_seed(cfg.seed + 1 + accelerator.process_index + step * accelerator.num_processes)
    sampler.seek(step)
    # Its own generator: creating the loader's iterator must not draw from the RNG the checkpoint restored.
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=iter(sampler), collate_fn=collate,
                                         num_workers=cfg.num_workers, generator=torch.Generator())
    log_path = out / "train_log.jsonl"
    history = []
    bar = tqdm(total=cfg.steps, initial=step, desc="train", disable=not accelerator.is_main_process)
    for batch in loader:
        if step >= cfg.steps:
            break
        epoch, position = sampler.locate(step)
        record = train_step(cfg, model, adapter, accelerator, transformer, optimizer, scheduler, batch)
        if position == 0:  # an epoch's first step logs what the epoch draws of each task
            record["epoch"] = sampler.epoch_report(epoch)
        if not history and left_out:  # this invocation's first step
            record["left_out"] = dict(left_out)
        if batch["skipped"]:
            record["skipped"] = batch["skipped"]
        step += 1
        record["step"] = step
        history.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", fm=f"{record['flow']:.4f}", task=f"{record['task']:.4f}")
        if accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if held and (step % cfg.validation.every == 0 or step == cfg.steps):
            losses = validate(model, adapter, held, cfg.validation, cfg.guidance, accelerator)
            if accelerator.is_main_process:
                with open(out / "val_log.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, "val": losses}) + "\n")
                bar.write(f"step {step} validation: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_checkpoint(accelerator, out, step, cfg.keep_checkpoints, *state)
    bar.close()
    # Every process takes part (a sharded tensor is gathered from all of them); the main one writes.
    write = accelerator.is_main_process
    save_adapter(pipe.transformer, out / "adapter", base_model_id=cfg.base, write=write)
    if x2i is not None:  # also when frozen: the adapter was trained against exactly these weights
        from trainer.x2i import ALIGNNET_NAME, save_alignnet

        save_alignnet(x2i.alignnet, out / "adapter" / ALIGNNET_NAME, mllm=cfg.x2i.mllm, write=write)
    accelerator.print(f"adapter written to {out / 'adapter'}")
    accelerator.wait_for_everyone()
    return history


def train_step(cfg, model: EditModel, adapter, accelerator, transformer, optimizer, scheduler, batch) -> dict:
    device = accelerator.device
    target = model.encode_images(batch["target"])
    reference = model.encode_images(batch["source"])
    text = model.encode_text(batch["instruction"])
    task_ids = batch["task_id"].to(device)
    with adapter.task(task_ids), accelerator.autocast():
        loss, flow, task = model.loss(target, reference, text, task_ids, timesteps=cfg.timesteps,
                                      guidance=cfg.guidance, tau=cfg.contrastive.tau, weight=cfg.contrastive.weight)
        accelerator.backward(loss)  # inside the task scope: checkpointed blocks re-run their gates
    if accelerator.sync_gradients:  # the reference clips the transformer only, not a trained AlignNet
        accelerator.clip_grad_norm_(transformer.parameters(), cfg.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    logged = accelerator.reduce(torch.stack([loss, flow, task]).detach(), reduction="mean")  # over processes
    return {"loss": logged[0].item(), "flow": logged[1].item(), "task": logged[2].item(),
            "lr": scheduler.get_last_lr()[0]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--steps", type=int, help="override the recipe's steps")
    parser.add_argument("--out-dir", help="override the recipe's out_dir")
    parser.add_argument("--data", nargs="+", help="override the recipe's shard globs")
    args = parser.parse_args(argv)
    train(load_train_config(args.recipe, steps=args.steps, out_dir=args.out_dir, data=args.data))


if __name__ == "__main__":
    main()
