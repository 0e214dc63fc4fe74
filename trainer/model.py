"""The edit model around a FLUX.1 pipeline: reference-image conditioning, text conditioning, and the
double-block features the task loss reads.

Reference image. Its latent tokens join the sequence after the noisy target tokens, with their own position
ids, and the model predicts only the target tokens. Two id layouts:
  - "kontext" (default): the reference tokens sit at index axis 0 = 1 over the same (row, col) grid, as in
    FLUX.1 Kontext. They share the noisy tokens' timestep modulation, which is exactly what stock
    `FluxTransformer2DModel` computes — so any FLUX.1 variant (dev, schnell, Krea, Kontext itself) trains
    with no fork of the transformer, and a Kontext checkpoint starts from weights made for this layout.
  - "row_offset": the X2Edit reference's ids, rows shifted by its `--offset`: +64 at 512 px, +128 at 1024 px
    (reference-code.md §3.4), the VAE latent's height at the run's resolution, the same for every aspect
    bucket: twice the token rows of the square, so the two grids never overlap. The reference also gives
    the reference tokens their own timestep-0 modulation (EasyControl), which needs a forked transformer;
    that part is left out, the ids are kept so the layout can be compared.
Text. FLUX's own CLIP + T5 (`pipe.encode_prompt`) by default; any `TextEncoder` given to `EditModel` replaces
them, such as the paper's X2I route (Qwen2.5-VL hidden states → AlignNet, trainer/x2i.py).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Protocol

import torch

from trainer.losses import flow_matching_loss, sample_sigmas, task_infonce

LAYOUTS = ("kontext", "row_offset")


@dataclass
class TextEmbeds:
    prompt_BLD: torch.Tensor
    pooled_BD: torch.Tensor
    ids_L3: torch.Tensor


class TextEncoder(Protocol):
    """Prompts → FLUX's text inputs (context of joint_attention_dim, pooled of pooled_projection_dim). It
    decides itself what carries gradients: `EditModel.encode_text` does not wrap it in no_grad."""

    def __call__(self, prompts: list[str]) -> TextEmbeds: ...


def pack(latents_BCHW: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H/2·W/2, 4C): FLUX's 2×2 patch packing."""
    b, c, h, w = latents_BCHW.shape
    x = latents_BCHW.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens_BNP: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `pack` for a latent of height h and width w."""
    b, _, p = tokens_BNP.shape
    x = tokens_BNP.view(b, h // 2, w // 2, p // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, p // 4, h, w)


def latent_ids(h_tokens: int, w_tokens: int, layout: str, reference: bool, row_offset: int) -> torch.Tensor:
    """Position ids (N, 3) = (index, row, col) of a packed latent grid, for the target or the reference;
    `row_offset` is the row_offset layout's shift of the reference rows."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown reference layout {layout!r}; choose one of {LAYOUTS}")
    ids = torch.zeros(h_tokens, w_tokens, 3)
    ids[..., 1] = torch.arange(h_tokens)[:, None]
    ids[..., 2] = torch.arange(w_tokens)[None, :]
    if reference and layout == "kontext":
        ids[..., 0] = 1
    elif reference:
        ids[..., 1] += row_offset
    return ids.reshape(-1, 3)


class EditModel:
    """Wraps a loaded FLUX pipeline (vae, text encoders, transformer with an MoE-LoRA installed).

    `forward_module` is what gets called: the transformer itself, or its DDP/FSDP wrapper when training on
    several processes (so gradients are synchronised). Calls to `predict` and the backward pass run inside
    `with adapter.task(task_ids):`, which gives the gates the batch's task embedding. `text_encoder`, when
    given, replaces the pipeline's CLIP + T5 (which then need not be loaded). `resolution` is the run's
    (the recipe's, or the editor's `--resolution`): the row_offset layout's shift depends on it."""

    def __init__(self, pipe, layout: str = "kontext", max_sequence_length: int = 512, forward_module=None,
                 text_encoder: TextEncoder | None = None, resolution: int = 512):
        self.pipe, self.layout, self.max_len = pipe, layout, max_sequence_length
        self.transformer = pipe.transformer
        self.forward_module = forward_module or pipe.transformer
        self.text_encoder = text_encoder
        self.row_offset = resolution // pipe.vae_scale_factor if layout == "row_offset" else 0

    @torch.no_grad()
    def encode_images(self, images_B3HW: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] → normalised latents (B, C, h, w) as the FLUX trainers compute them."""
        vae = self.pipe.vae
        x = images_B3HW.to(vae.device, vae.dtype)
        latents = vae.encode(x).latent_dist.sample(generator)
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents_BCHW: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        x = latents_BCHW.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        return vae.decode(x).sample.clamp(-1, 1)

    def encode_text(self, prompts: list[str]) -> TextEmbeds:
        if self.text_encoder is not None:
            return self.text_encoder(prompts)  # a trainable AlignNet needs its graph kept
        with torch.no_grad():
            prompt, pooled, ids = self.pipe.encode_prompt(prompt=prompts, prompt_2=None,
                                                          device=self.transformer.device,
                                                          max_sequence_length=self.max_len)
        return TextEmbeds(prompt, pooled, ids)

    def image_ids(self, h: int, w: int) -> torch.Tensor:
        """Position ids of the target tokens, then the reference tokens, for latents of height h and width w."""
        return torch.cat([latent_ids(h // 2, w // 2, self.layout, reference, self.row_offset)
                          for reference in (False, True)])

    def predict(self, noisy_BCHW: torch.Tensor, reference_BCHW: torch.Tensor, text: TextEmbeds,
                sigma_B: torch.Tensor, guidance: float, features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Velocity for the noisy target latents (B, C, h, w); fills `features` with the image-stream output
        of every double block (target tokens only) when a list is given."""
        b, _, h, w = noisy_BCHW.shape
        target_BNP, reference_BNP = pack(noisy_BCHW), pack(reference_BCHW)
        n = target_BNP.shape[1]
        img_ids = self.image_ids(h, w).to(target_BNP.device, target_BNP.dtype)
        dtype = self.transformer.dtype
        kwargs = {}
        if self.transformer.config.guidance_embeds:
            kwargs["guidance"] = torch.full((b,), guidance, device=target_BNP.device, dtype=dtype)
        with self._capture(features, n):
            out_BNP = self.forward_module(
                hidden_states=torch.cat([target_BNP, reference_BNP], dim=1).to(dtype),
                encoder_hidden_states=text.prompt_BLD.to(dtype), pooled_projections=text.pooled_BD.to(dtype),
                timestep=sigma_B.to(dtype), img_ids=img_ids, txt_ids=text.ids_L3, return_dict=False, **kwargs)[0]
        return unpack(out_BNP[:, :n], h, w)

    def loss(self, target_BCHW: torch.Tensor, reference_BCHW: torch.Tensor, text: TextEmbeds,
             task_ids_B: torch.Tensor, *, timesteps: str, guidance: float, tau: float,
             weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total, flow matching, task InfoNCE) for clean latents: noise the target at σ, predict, score.

        Call inside `with adapter.task(task_ids):` (and autocast), and run the backward pass there too."""
        noise = torch.randn_like(target_BCHW)
        sigma_B = sample_sigmas(target_BCHW.shape[0], timesteps).to(target_BCHW.device)
        s = sigma_B.view(-1, 1, 1, 1).to(target_BCHW.dtype)
        noisy = (1 - s) * target_BCHW + s * noise
        features: list[torch.Tensor] = []
        pred = self.predict(noisy, reference_BCHW, text, sigma_B, guidance, features)
        flow = flow_matching_loss(pred, target_BCHW, noise)
        task = task_infonce(features, task_ids_B, tau)
        return flow + weight * task, flow, task

    @contextmanager
    def _capture(self, features: list[torch.Tensor] | None, n_target: int) -> Iterator[None]:
        """Forward hooks on the double blocks; only the first forward counts (gradient checkpointing re-runs
        the blocks during backward, after this scope has closed)."""
        if features is None:
            yield
            return
        blocks = list(self.transformer.transformer_blocks)

        def hook(module, args, output):
            if len(features) < len(blocks):
                features.append(output[1][:, :n_target])  # (encoder_hidden_states, hidden_states)

        handles = [block.register_forward_hook(hook) for block in blocks]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
