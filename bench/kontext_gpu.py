"""FLUX.1 Kontext editing on one GPU through the pipeline's own editor (workers/diffusers_editor.py): s/image and
peak memory at 512 px and at the reference's 1024-px bucket, batch 1/2/4, 28 steps, guidance 2.5. A few minutes
on an H100/H200.

    python -m bench.kontext_gpu                          # CUDA; exits 0 with a message without one
    python -m bench.kontext_gpu --device cpu --tiny      # the same code on the tiny Kontext (tests)

Setup. Random weights at FLUX.1-Kontext-dev's sizes, built directly on the device in bf16 (no checkpoint, no host
copy): the transformer (FLUX.1-dev's config, 11.90 B), a T5-XXL encoder (24 layers, d_model 4096, d_ff 10240,
64 heads: 4.63 B), a CLIP-L text encoder (12 layers, 768 wide: 85 M) and FLUX's VAE (16 latent channels, ×8:
84 M). The tokenizers are the tiny character-level ones (trainer/tiny_flux.py): only the embedding tables
shrink (the real vocabularies add 0.13 B and 38 M), and T5 pads every prompt to max_sequence_length 512 and
CLIP to 77 tokens, so the compute is the real model's.
Random weights cost what trained ones cost (same shapes, same kernels); the images are meaningless.
The timed call is `DiffusersEditor.edit(images, requests)` with this pipeline injected: resize to the edit size,
one pipeline call per batch (CLIP + T5 encode, VAE encode of the reference, the denoising steps over target +
reference tokens, VAE decode), resize back. Warm-up: one call per size and batch at 1 step.
Needs diffusers and pydantic on the GPU box (carry their wheels: diffusers, pydantic, pydantic-core,
annotated-types, typing-inspection). The editor's out-of-memory back-off would hide an OOM by halving the
batch: a row says so (`backoff`) instead of timing the smaller batches as the asked one.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from bench.flux_train_step_gpu import FLUX_DEV, build_transformer, release, sync
from trainer.tiny_flux import flux_components

CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu")
FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=1024,
                scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
# (label, the editor's `resolution`, source image side): 512-px mode, and the 1024² bucket of the 13.
SIZES = (("512", 512, 512), ("1024", "buckets", 1024))
TINY_SIZES = (("64", 64, 64), ("128", 128, 128))
PROMPT = "Turn the photo into a watercolor painting"


@contextlib.contextmanager
def bf16_on(device: str):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_pipeline(tiny: bool, device: str):
    """The tiny Kontext as tests build it, or full size: the tiny parts' tokenizers and scheduler (FLUX's config)
    with full-size models in their place."""
    from diffusers import AutoencoderKL, FluxKontextPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    parts = flux_components()
    if not tiny:
        with bf16_on(device):
            parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(
                vocab_size=len(parts["tokenizer"]), bos_token_id=0, eos_token_id=1, pad_token_id=1, **CLIP_L))
            parts["text_encoder_2"] = T5EncoderModel(T5Config(
                vocab_size=len(parts["tokenizer_2"]), pad_token_id=0, eos_token_id=1, **T5_XXL))
            parts["vae"] = AutoencoderKL(**FLUX_VAE)
        parts["transformer"] = build_transformer(FLUX_DEV, device)
    pipe = FluxKontextPipeline(**parts).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Backoffs(logging.Handler):
    """Collects the editor's out-of-memory back-off warnings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def time_size(pipe, resolution, side: int, batch: int, args, backoffs: Backoffs) -> dict:
    from workers.base import EditRequest
    from workers.diffusers_editor import DiffusersEditor, edit_size
    from workers.model_lifecycle import ItemFailed

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(batch)]
    requests = [EditRequest(op="instruction", params={}, instruction_en=PROMPT, instruction_zh="", seed=seed,
                            subject=None) for seed in range(batch)]

    def editor(steps: int) -> DiffusersEditor:
        cfg = DiffusersEditor.Config(model="random-init FLUX.1-Kontext-dev", dtype=args.dtype, steps=steps,
                                     resolution=resolution, batch_size=batch, tasks=("style_change",))
        return DiffusersEditor(cfg, pipeline=pipe)

    for _ in range(args.warmup):
        editor(1).edit(images, requests)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timed, times = editor(args.steps), []
    backoffs.messages.clear()
    for _ in range(args.repeats):
        sync(args.device)
        start = time.perf_counter()
        outputs = timed.edit(images, requests)
        sync(args.device)
        times.append(time.perf_counter() - start)
    failed = [o for o in outputs if isinstance(o, ItemFailed)]
    s = sum(times) / len(times)
    return {"edit_size_hw": list(edit_size(side, side, resolution)), "s_per_call": s, "s_per_image": s / batch,
            "s_per_image_step": s / batch / args.steps, "call_times_s": times,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if args.device == "cuda" else None,
            "backoff": list(backoffs.messages), "status": "oom" if failed else "ok"}


def markdown(report: dict) -> str:
    lines = [f"# Kontext editing, {report['card']}", "",
             f"{report['model']}, {report['dtype']}, {report['steps']} steps, guidance 2.5; "
             f"versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), "",
             "| size | edit size | batch | s/call | s/image | s/image/step | peak GiB | status |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        if r["status"] == "ok":
            mem = "n/a" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"
            size = "×".join(map(str, r["edit_size_hw"][::-1]))
            lines.append(f"| {r['size']} | {size} | {r['batch']} | {r['s_per_call']:.2f} | {r['s_per_image']:.2f} "
                         f"| {r['s_per_image_step']:.3f} | {mem} | ok{' (backed off)' if r['backoff'] else ''} |")
        else:
            lines.append(f"| {r['size']} | | {r['batch']} | | | | | {r['status']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny Kontext (width 32), 64 and 128 px")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--max-seconds", type=float, default=480, help="skip sizes that would end past this")
    parser.add_argument("--out", default="bench/results/kontext_gpu.json", help="and a .md table beside it")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("kontext_gpu: no CUDA device here, nothing to benchmark "
              "(`--device cpu --tiny` runs the same code on the tiny Kontext).")
        return 0
    if args.device == "cpu" and not args.tiny:
        parser.error("the full-size model on CPU would need 70 GB and hours; add --tiny")
    args.dtype = "float32" if args.device == "cpu" else "bfloat16"
    start = time.perf_counter()
    try:
        import diffusers
        import pydantic  # noqa: F401  (the editor's config)
    except ImportError as e:  # the GPU box lacks both: carry their wheels
        print(f"kontext_gpu: {e}; install diffusers and pydantic first", file=sys.stderr)
        return 2
    from workers.model_lifecycle import library_versions

    card = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or platform.machine())
    versions = {"python": platform.python_version(), "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
                **library_versions("torch", "transformers")}
    torch.manual_seed(0)
    pipe = build_pipeline(args.tiny, args.device)
    params = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
              for name in ("transformer", "text_encoder_2", "text_encoder", "vae")}
    build_s = time.perf_counter() - start
    print(f"card: {card}  |  " + "  ".join(f"{k} {v}" for k, v in versions.items()))
    print("model: " + ", ".join(f"{k} {v / 1e6:,.0f} M" for k, v in params.items()) + f"  (built in {build_s:.0f} s)")

    report = {"card": card, "versions": versions, "device": args.device, "tiny": args.tiny, "dtype": args.dtype,
              "model": "tiny FLUX.1 Kontext" if args.tiny else "FLUX.1-Kontext-dev sizes, random weights",
              "params": params, "build_s": build_s, "steps": args.steps, "warmup": args.warmup,
              "repeats": args.repeats, "results": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    backoffs = Backoffs()
    logging.getLogger("workers.model_lifecycle").addHandler(backoffs)
    print(f"\n{'size':>5} {'batch':>5} {'s/call':>8} {'s/image':>8} {'peak GiB':>9}  status")
    for label, resolution, side in TINY_SIZES if args.tiny else SIZES:
        last: dict = {}
        for batch in sorted(set(args.batch_sizes)):
            row = {"size": label, "batch": batch}
            eta = last.get("s_per_image", 0) * batch * (args.repeats + args.warmup / args.steps)
            if last.get("status") == "oom":
                row["status"] = "skipped: a smaller batch ran out of memory"
            elif time.perf_counter() - start + eta > args.max_seconds:
                row["status"] = f"skipped: would end past --max-seconds {args.max_seconds:.0f}"
            else:
                try:
                    row.update(time_size(pipe, resolution, side, batch, args, backoffs))
                except Exception as e:  # a one-shot run on a lent GPU: report it and go on to the next size
                    traceback.print_exc()
                    row.update(status="error", error=f"{type(e).__name__}: {e}")
                release([])  # no gradients here: collect and return the cached blocks
            if row["status"] == "ok":
                mem = "n/a" if row["peak_memory_gib"] is None else f"{row['peak_memory_gib']:.1f}"
                print(f"{label:>5} {batch:>5} {row['s_per_call']:>8.3f} {row['s_per_image']:>8.3f} {mem:>9}  ok"
                      + (f" (backed off: {row['backoff'][0]})" if row["backoff"] else ""), flush=True)
            else:
                print(f"{label:>5} {batch:>5} {'-':>8} {'-':>8} {'-':>9}  {row['status']}", flush=True)
            report["results"].append(row)
            report["wall_s"] = time.perf_counter() - start
            out.write_text(json.dumps(report, indent=2) + "\n")  # after every size: a killed run keeps what it has
            out.with_suffix(".md").write_text(markdown(report))
            last = row
    print(f"\nwritten to {out} and {out.with_suffix('.md')}  ({report['wall_s']:.0f} s)")
    return 0 if any(r["status"] == "ok" for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
