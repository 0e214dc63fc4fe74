"""Tiny random-weight checkpoints of the model workers' families, built offline at first use and saved with
`save_pretrained`, so tests and the CPU runs load them through the same `from_pretrained` path as a real
checkpoint. The parts come from the trainer's tiny models (trainer/tiny_flux.py): one builder for both.

    python -m workers.tiny_models            # builds them into $X2EDIT_TINY_MODELS (default: models/)
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from trainer.tiny_flux import flux_components, publish, qwen25vl_parts

TINY_MODELS_ENV = "X2EDIT_TINY_MODELS"
DEFAULT_DIR = Path(__file__).resolve().parents[1] / "models"  # gitignored


def tiny_models_dir() -> Path:
    return Path(os.environ.get(TINY_MODELS_ENV) or DEFAULT_DIR)


def build_tiny(name: str) -> Path:
    """The folder of the tiny model `name` (built on first use): what `tiny:<name>` in a recipe resolves to."""
    builders = {"flux-kontext": build_tiny_kontext, "qwen-image-edit": build_tiny_qwen_image_edit}
    if name not in builders:
        raise ValueError(f"no tiny model {name!r}; there are: {', '.join(sorted(builders))}")
    return builders[name]()


def build_tiny_kontext(path: str | Path | None = None, seed: int = 0) -> Path:
    """A FluxKontextPipeline with FLUX.1's classes at widths of 32 (VAE ×2: a 64-px image is 256 tokens).
    Idempotent: an existing build is reused; a concurrent or killed build leaves no half folder."""
    path = Path(path) if path else tiny_models_dir() / "tiny-flux-kontext"
    if (path / "model_index.json").exists():
        return path
    from diffusers import FluxKontextPipeline

    return publish(path, FluxKontextPipeline(**flux_components(seed)))


def build_tiny_qwen_image_edit(path: str | Path | None = None, seed: int = 0) -> Path:
    """A QwenImageEditPipeline: the tiny Qwen2.5-VL as text encoder, a 2-layer transformer, a ×8 VAE (the
    pipeline encodes its reference image at ~1 MP whatever the output size: ×8 keeps that to 4k tokens).
    Idempotent like `build_tiny_kontext`."""
    path = Path(path) if path else tiny_models_dir() / "tiny-qwen-image-edit"
    if (path / "model_index.json").exists():
        return path
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2VLProcessor

    text_encoder, vl_processor = qwen25vl_parts(seed)
    processor = Qwen2VLProcessor(image_processor=vl_processor.image_processor, tokenizer=vl_processor.tokenizer,
                                 video_processor=vl_processor.video_processor)  # the class the pipeline declares
    torch.manual_seed(seed)
    z = 4  # latent channels; the transformer sees them 2×2-packed
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=z, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                 temperal_downsample=[False, True, True], latents_mean=[0.0] * z,
                                 latents_std=[1.0] * z)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=4 * z, out_channels=z, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2,
                                              joint_attention_dim=text_encoder.config.text_config.hidden_size,
                                              axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                base_image_seq_len=256, max_image_seq_len=8192,
                                                time_shift_type="exponential")
    pipe = QwenImageEditPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                                 tokenizer=processor.tokenizer, processor=processor, transformer=transformer)
    return publish(path, pipe)


if __name__ == "__main__":
    print(build_tiny_kontext())
    print(build_tiny_qwen_image_edit())
