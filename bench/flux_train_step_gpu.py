"""Training step of the full-size FLUX.1-dev transformer with the X2Edit MoE-LoRA, on one GPU: s/step, peak
memory and MFU for a few micro-batch sizes at 512 px. Takes about 1-2 minutes on an H100.

    python -m bench.flux_train_step_gpu                          # CUDA; exits 0 with a message without one
    python -m bench.flux_train_step_gpu --device cpu --tiny      # the same code on the tiny FLUX (tests)

Setup. Random weights, built directly on the device in bf16 (no checkpoint, no 24 GB host copy). The adapter
is installed by trainer.placement and kept in fp32 under bf16 autocast, as trainer/train.py trains it: the
GEMMs run in bf16 either way, fp32 costs memory (16 B/param with AdamW: 15.8 GB for 985 M) and some casts,
and that is what a real run pays. Gradient checkpointing is on. One step is trainer.train.train_step after
its VAE and text encoders: EditModel.predict on 1024 target + 1024 reference tokens (Kontext ids) and 512
random text tokens, flow matching + 0.2 x task InfoNCE on the 19 double blocks' image-stream outputs,
backward inside `adapter.task(...)`, grad clipping, AdamW over the adapter, loss.item(). Task ids come in
pairs (the P x K sampler); at micro-batch 1 no anchor has a positive and InfoNCE is a constant 0.

FLOPs per sample (matmuls only; per-sample modulation and embedding MLPs and the loss are < 0.1 %). D =
heads x head_dim (3072), MLP width 4D, L text tokens (512), N image tokens = target + reference (2048),
S = L + N, C = in_channels (64), J = joint_attention_dim (4096), n = double + single blocks (57):
    blk  = 24 S D^2 n      block linears: double = q,k,v,out (4D^2) + MLP (8D^2) per token of each stream;
                           single = q,k,v (3D^2) + proj_mlp (4D^2) + proj_out (5D^2)
    emb  = 2 N C D + 2 L J D   x_embedder, context_embedder         out = 2 N D C   proj_out
    attn = 4 S^2 D n       QK^T and PV
    ad_k = sum over the 190 sites of T (2 (k+1) R (I+O) + 2 I E), T = N (double blocks' image stream) or S
           (single blocks), R rank, E experts; k = 2 (top-2: the useful work) or E (dense-masked: what runs)
Frozen base, so backward = dX only: 1x for blk and out (none for emb: its inputs need no gradient), 2.5x
for attn (FlashAttention's backward does 5 matmuls to the forward's 2), 2x for the adapter (dX + dW).
Checkpointing re-runs every block's forward once more.
    useful   = B (2 blk + emb + 2 out + 3.5 attn + 3 ad_2)                       no recompute, top-2 adapter
    hardware = B (3 blk + emb + 2 out + 4.5 attn + 4 ad_E)          recompute and the dense adapter executed
At 512 px per sample: useful 85.4 TF, hardware 138.3 TF; x 12 = 1.03 and 1.66 PF, anchors-trainer.md section 6.
torch.utils.flop_counter on the meta-device model agrees, except that it counts the attention backward as 2x
(it leaves out FlashAttention's recompute of QK^T). MFU = FLOPs / (s/step x peak), the peak being the bf16
matmul throughput measured in this run (8192^3 GEMMs): a share of what this card sustains, not of its spec
sheet (989 TF/s dense on an H100 SXM).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before CUDA starts: less fragmentation

import torch

from trainer.model import EditModel, TextEmbeds
from trainer.moe_lora import MoELoRAConfig
from trainer.placement import install_moe_lora

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
TINY_FLUX = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                 axes_dims_rope=(4, 6, 6))  # trainer/tiny_flux.py
# TrainConfig's defaults (trainer/config.py, not imported: it needs pydantic, which the GPU box may lack).
LR, BETAS, WEIGHT_DECAY, EPS, MAX_GRAD_NORM = 1e-4, (0.9, 0.999), 1e-4, 1e-8, 1.0
GUIDANCE, LAMBDA, TAU, TIMESTEPS = 1.0, 0.2, 0.5, "uniform"


# ---------------------------------------------------------------- model
def build_transformer(config: dict, device: str) -> torch.nn.Module:
    """Every parameter is created on `device` in bf16 and initialised there: seconds on a GPU, no host RAM."""
    from diffusers import FluxTransformer2DModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            return FluxTransformer2DModel(**config)
    finally:
        torch.set_default_dtype(previous)  # the adapter below is created in fp32


def flops_per_sample(cfg: dict, adapter, n_img: int, n_txt: int) -> dict[str, float]:
    """Forward matmul FLOPs of one sample by part; the docstring's formula."""
    D, S, C = cfg["num_attention_heads"] * cfg["attention_head_dim"], n_img + n_txt, cfg["in_channels"]
    J, n = cfg["joint_attention_dim"], cfg["num_layers"] + cfg["num_single_layers"]
    parts = {"blocks": 24 * S * D * D * n, "embedders": 2 * n_img * C * D + 2 * n_txt * J * D,
             "proj_out": 2 * n_img * D * C, "attention": 4 * S * S * D * n, "adapter_topk": 0, "adapter_dense": 0}
    for site, layer in adapter.sites.items():
        T = S if site.startswith("single_") else n_img
        I, O, c = layer.base.in_features, layer.base.out_features, layer.config
        gate = 2 * I * c.num_experts
        parts["adapter_topk"] += T * (2 * (c.top_k + 1) * c.rank * (I + O) + gate)
        parts["adapter_dense"] += T * (2 * (c.num_experts + 1) * c.rank * (I + O) + gate)
    p, base = parts, parts["embedders"] + 2 * parts["proj_out"]
    p["useful_step"] = base + 2 * p["blocks"] + 3.5 * p["attention"] + 3 * p["adapter_topk"]
    p["hardware_step"] = base + 3 * p["blocks"] + 4.5 * p["attention"] + 4 * p["adapter_dense"]
    return {k: float(v) for k, v in p.items()}


# ---------------------------------------------------------------- timing helpers
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: str, n: int, seconds: float = 0.5) -> float:
    """Best of 3 bursts of n x n x n bf16 GEMMs, in FLOP/s: the card's sustained matmul ceiling."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty_like(a)
    best, reps = 0.0, 3
    for _ in range(4):  # the first burst warms up (clocks, cuBLAS) and sizes the others
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=c)
        sync(device)
        dt = time.perf_counter() - t0
        best = max(best, 2 * n ** 3 * reps / dt)
        reps = max(3, int(seconds * best / (2 * n ** 3)))
    del a, b, c
    return best


# ---------------------------------------------------------------- the training step
def make_batch(cfg: dict, b: int, latent: int, n_txt: int, num_tasks: int, device: str):
    """Latents (B, C/4, h, w) as the VAE gives them in bf16, text as encode_prompt gives it."""
    c, dt = cfg["in_channels"] // 4, torch.bfloat16
    target, reference = (torch.randn(b, c, latent, latent, device=device, dtype=dt) for _ in range(2))
    text = TextEmbeds(torch.randn(b, n_txt, cfg["joint_attention_dim"], device=device, dtype=dt),
                      torch.randn(b, cfg["pooled_projection_dim"], device=device, dtype=dt),
                      torch.zeros(n_txt, 3, device=device, dtype=dt))
    task_ids = torch.arange(b, device=device) // 2 % num_tasks  # pairs of one task: every anchor has a positive
    return target, reference, text, task_ids


def train_step(model: EditModel, adapter, optimizer, params, batch, device: str) -> float:
    """trainer.train.train_step without the encoders (same `EditModel.loss`); accelerate's autocast,
    backward and clip are these calls."""
    target, reference, text, task_ids = batch
    with adapter.task(task_ids), torch.autocast(device, dtype=torch.bfloat16):
        loss, _, _ = model.loss(target, reference, text, task_ids, timesteps=TIMESTEPS, guidance=GUIDANCE,
                                tau=TAU, weight=LAMBDA)
        loss.backward()  # inside the task scope: checkpointed blocks re-run their gates
    torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()  # train_step logs it, which syncs every step


def time_size(model, adapter, params, cfg, b, args, geometry) -> dict:
    optimizer = torch.optim.AdamW(params, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, eps=EPS)  # fresh state
    batch = make_batch(cfg, b, *geometry, adapter.config.num_tasks, args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        train_step(model, adapter, optimizer, params, batch, args.device)
    times, losses = [], []
    for _ in range(args.steps):
        sync(args.device)
        t0 = time.perf_counter()
        losses.append(train_step(model, adapter, optimizer, params, batch, args.device))
        sync(args.device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if args.device == "cuda" else None
    return {"s_per_step": sum(times) / len(times), "step_times_s": times, "peak_memory_gib": peak, "loss": losses[-1]}


def release(params) -> None:
    for p in params:
        p.grad = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny FLUX (width 32), 64 px, 8 text tokens")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=180, help="skip sizes that would end past this")
    parser.add_argument("--out", default="bench/results/flux_train_step_gpu.json")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("flux_train_step_gpu: no CUDA device here, nothing to benchmark "
              "(`--device cpu --tiny` runs the same code on a tiny model).")
        return 0
    if args.device == "cpu" and not args.tiny:
        parser.error("the full-size model on CPU would need 48 GB and hours; add --tiny")
    start = time.perf_counter()
    try:
        import diffusers
    except ImportError as e:  # the GPU box may lack it: the lead carries a wheel (it also needs Pillow)
        print(f"flux_train_step_gpu: cannot import diffusers ({e}); install it (and Pillow) first", file=sys.stderr)
        return 2

    cfg = TINY_FLUX if args.tiny else FLUX_DEV
    latent, n_txt = (8, 8) if args.tiny else (64, 512)  # 512 px / VAE factor 8; T5 max_sequence_length 512
    n_img = 2 * (latent // 2) ** 2  # 2x2-packed target + reference tokens
    card = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or platform.machine())
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                "diffusers": diffusers.__version__}
    peak = matmul_peak(args.device, 256 if args.tiny else 8192)
    print(f"card: {card}  |  " + "  ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"bf16 matmul peak ({256 if args.tiny else 8192}^3): {peak / 1e12:.1f} TFLOP/s")

    torch.manual_seed(0)
    transformer = build_transformer(cfg, args.device)
    adapter = install_moe_lora(transformer, MoELoRAConfig(8, 8, 4) if args.tiny else MoELoRAConfig())  # rank, alpha, E
    adapter.to(args.device, torch.float32)  # as train.py: trainable weights stay fp32 under bf16 autocast
    transformer.enable_gradient_checkpointing()
    model = EditModel(SimpleNamespace(transformer=transformer))  # predict() needs only the transformer
    params = [p for p in transformer.parameters() if p.requires_grad]
    n_base = sum(p.numel() for p in transformer.parameters() if not p.requires_grad)
    n_adapter = sum(p.numel() for p in params)
    flops = flops_per_sample(cfg, adapter, n_img, n_txt)
    print(f"model: {'tiny FLUX' if args.tiny else 'FLUX.1-dev'} {n_base / 1e6:,.1f} M bf16 + MoE-LoRA "
          f"{n_adapter / 1e6:,.1f} M fp32, gradient checkpointing; tokens/sample {n_txt} text + {n_img} image "
          f"(built in {time.perf_counter() - start:.0f} s)")

    report = {"card": card, "versions": versions, "device": args.device, "tiny": args.tiny,
              "matmul_peak_tflops": peak / 1e12,
              "transformer_config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
              "adapter": {**vars(adapter.config), "dtype": "float32", "sites": len(adapter.sites)},
              "params": {"base": n_base, "adapter": n_adapter}, "tokens_per_sample": {"text": n_txt, "image": n_img},
              "warmup": args.warmup, "steps": args.steps, "flops_per_sample": flops, "results": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"\n{'mb':>3} {'s/step':>8} {'samples/s':>10} {'peak GiB':>9} {'useful TF':>10} {'MFU useful':>11} "
          f"{'hw TF':>8} {'MFU hw':>7}  status")
    last: dict = {}
    for b in sorted(set(args.batch_sizes)):
        row = {"micro_batch": b}
        eta = last.get("s_per_step", 0) * b / last.get("micro_batch", 1) * (args.warmup + args.steps + 1)
        if last.get("status") == "oom":
            row["status"] = "skipped: a smaller micro-batch ran out of memory"
        elif time.perf_counter() - start + eta > args.max_seconds:
            row["status"] = f"skipped: would end past --max-seconds {args.max_seconds:.0f}"
        else:
            try:
                row.update(time_size(model, adapter, params, cfg, b, args, (latent, n_txt)), status="ok")
            except torch.OutOfMemoryError as e:
                row.update(status="oom", error=str(e).splitlines()[0])
            except Exception as e:  # a one-shot run on a lent GPU: report it and go on to the next size
                traceback.print_exc()
                row.update(status="error", error=f"{type(e).__name__}: {e}")
            release(params)  # outside the except: the traceback no longer holds the activations
        if row["status"] == "ok":
            s, useful, hardware = row["s_per_step"], b * flops["useful_step"], b * flops["hardware_step"]
            row.update(samples_per_s=b / s, useful_tflop_per_step=useful / 1e12,
                       hardware_tflop_per_step=hardware / 1e12, mfu_useful=useful / s / peak,
                       mfu_hardware=hardware / s / peak)
            mem = "n/a" if row["peak_memory_gib"] is None else f"{row['peak_memory_gib']:.1f}"
            print(f"{b:>3} {s:>8.3f} {b / s:>10.2f} {mem:>9} {useful / 1e12:>10.1f} {row['mfu_useful']:>11.1%} "
                  f"{hardware / 1e12:>8.1f} {row['mfu_hardware']:>7.1%}  ok (loss {row['loss']:.3g})", flush=True)
        else:
            print(f"{b:>3} " + " ".join(f"{'-':>{w}}" for w in (8, 10, 9, 10, 11, 8, 7)) + f"  {row['status']}")
        report["results"].append(row)
        report["wall_s"] = time.perf_counter() - start
        out.write_text(json.dumps(report, indent=2) + "\n")  # after every size: a killed run keeps what it measured
        last = row
    print(f"\nwritten to {out}  ({report['wall_s']:.0f} s)")
    return 0 if any(r["status"] == "ok" for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
