"""Edit an image with a trained MoE-LoRA adapter.

    python -m trainer.edit --base PATH --adapter runs/train-tiny/adapter --image in.jpg \
        --instruction "Remove the red object" --out out.png [--task subject_removal] [--lora community.safetensors]
        [--x2i-mllm Qwen2.5-VL-7B-Instruct [--x2i-alignnet qwen2.5-vl-7b_proj.pt]]

The task id for the gates comes from `--task` or from the instruction (trainer/classify.py). A community LoRA
given with `--lora` is fused into the base weights first, then the adapter is installed on top (the
reference's plug-and-play order). The image is resized and centre-cropped to the aspect bucket that training
uses at `--resolution` (trainer/data.py: the closest of the 13 ~1 MP buckets at 1024, else the square), and
the edit has the bucket's size. Sampling: Euler steps of the flow-matching ODE with the reference image's
tokens in the sequence, FLUX's resolution-dependent timestep shift, guidance embedding from `--guidance`.
Text conditioning is FLUX's CLIP + T5 unless `--x2i-mllm` is given: then Qwen2.5-VL + AlignNet (trainer/x2i.py),
with the AlignNet the adapter was trained with (`<adapter>/alignnet.safetensors`) unless `--x2i-alignnet` names
other weights. The instruction is encoded as in training (the raw text in the chat template), not with the
reference pipeline's dict-shaped inference prompt (reference-code.md §4.2).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainer.adapter_io import load_adapter, read_adapter_config
from trainer.classify import LLMTaskClassifier, resolve_task
from trainer.data import bucket_for, fit, to_uint8
from trainer.model import EditModel, TextEncoder


def load_editor(base: str, adapter_dir: str, lora: str | None = None, lora_scale: float = 1.0,
                dtype: torch.dtype = torch.float32, device: str = "cpu", clip_t5: bool = True):
    """`clip_t5=False` skips loading FLUX's text encoders (another `TextEncoder` replaces them)."""
    from diffusers import FluxPipeline

    skip = {} if clip_t5 else {"text_encoder": None, "text_encoder_2": None}
    pipe = FluxPipeline.from_pretrained(base, dtype=dtype, **skip)
    if lora:
        pipe.load_lora_weights(lora)
        pipe.fuse_lora(lora_scale=lora_scale)
        pipe.unload_lora_weights()  # the fused weights stay; the LoRA modules go, so plain Linears remain
    adapter = load_adapter(pipe.transformer, adapter_dir)
    pipe.to(device)
    return pipe, adapter


def x2i_alignnet_path(adapter_dir: str, mllm: str | None, alignnet: str | None) -> Path | None:
    """The AlignNet weights to use with `mllm`, or None for CLIP + T5. Checked before anything loads: an adapter
    trained with X2I refuses CLIP + T5 (its conditioning would be meaningless)."""
    from trainer.x2i import ALIGNNET_NAME, alignnet_mllm

    saved = Path(adapter_dir) / ALIGNNET_NAME
    if mllm is None:
        if saved.exists():
            raise ValueError(f"{adapter_dir} was trained with X2I text conditioning (MLLM {alignnet_mllm(saved)!r}); "
                             "pass --x2i-mllm")
        return None
    if alignnet is None and not saved.exists():
        raise ValueError(f"--x2i-mllm given but {saved} does not exist; pass --x2i-alignnet")
    return Path(alignnet) if alignnet else saved


@torch.no_grad()
def edit(pipe, adapter, image: Image.Image, instruction: str, task_id: int, *, resolution: int = 512,
         steps: int = 28, guidance: float = 3.5, seed: int = 0, layout: str = "kontext",
         max_sequence_length: int = 512, text_encoder: TextEncoder | None = None) -> Image.Image:
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    model = EditModel(pipe, layout, max_sequence_length, text_encoder=text_encoder, resolution=resolution)
    # Multiples of 16: whole 2×2 tokens of FLUX's ×8 latent (the 1024-px buckets are already).
    size_hw = tuple(side // 16 * 16 for side in bucket_for(image.width, image.height, resolution))
    source = torch.from_numpy(fit(image, size_hw))[None]
    reference = model.encode_images(source)
    text = model.encode_text([instruction])
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(reference.shape, generator=generator).to(reference.device, reference.dtype)
    scheduler = pipe.scheduler
    tokens = (reference.shape[2] // 2) * (reference.shape[3] // 2)
    cfg = scheduler.config
    mu = calculate_shift(tokens, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                         cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu, device=reference.device)
    with adapter.task(torch.tensor([task_id], device=reference.device)):
        for t in scheduler.timesteps:
            sigma = (t / 1000).expand(1).to(reference.device)
            velocity = model.predict(latents, reference, text, sigma, guidance)
            latents = scheduler.step(velocity, t, latents).prev_sample
    pixels = model.decode_latents(latents)[0].float().cpu().numpy()
    return Image.fromarray(to_uint8(pixels))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="FLUX.1 pipeline path or id (default: the adapter's base model)")
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--instruction", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--task", help="task name or id (default: classify the instruction)")
    parser.add_argument("--classifier", help="a chat LM (path or id) that names the task; default: keyword rules")
    parser.add_argument("--lora", help="a community LoRA to fuse into the base first")
    parser.add_argument("--lora-scale", type=float, default=1.0)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-sequence-length", type=int, default=512, help="text tokens (T5, or X2I's MLLM)")
    parser.add_argument("--x2i-mllm", help="Qwen2.5-VL path or id: X2I text conditioning instead of CLIP + T5")
    parser.add_argument("--x2i-alignnet", help="AlignNet weights (default: <adapter>/alignnet.safetensors)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    base = args.base or read_adapter_config(args.adapter)["base_model_id"]
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    alignnet = x2i_alignnet_path(args.adapter, args.x2i_mllm, args.x2i_alignnet)
    pipe, adapter = load_editor(base, args.adapter, args.lora, args.lora_scale, dtype, args.device,
                                clip_t5=alignnet is None)
    text_encoder = None
    if alignnet is not None:
        from trainer.x2i import X2ITextEncoder

        config = pipe.transformer.config
        text_encoder = X2ITextEncoder(args.x2i_mllm, alignnet, args.max_sequence_length,
                                      joint_dim=config.joint_attention_dim,
                                      pooled_dim=config.pooled_projection_dim, device=args.device, dtype=dtype)
    classifier = LLMTaskClassifier(args.classifier, args.device) if args.classifier and not args.task else None
    task_id = resolve_task(args.task, args.instruction, classifier)
    result = edit(pipe, adapter, Image.open(args.image), args.instruction, task_id, resolution=args.resolution,
                  steps=args.steps, guidance=args.guidance, seed=args.seed,
                  max_sequence_length=args.max_sequence_length, text_encoder=text_encoder)
    result.save(args.out)
    print(f"task {task_id}; wrote {args.out}")


if __name__ == "__main__":
    main()
