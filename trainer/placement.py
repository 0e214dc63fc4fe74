"""Where the MoE-LoRA goes in a diffusers `FluxTransformer2DModel`, and installing/removing it.

The reference placement (reference-code.md §3.5): in each of the 19 double-stream blocks the image-stream
projections `to_q, to_k, to_v, to_out.0` (the text stream has its own `add_*_proj`/`to_add_out`, left
alone), and in each of the 38 single-stream blocks `to_q, to_k, to_v`, which act on the joint
[text ‖ image] sequence. 19·4 + 38·3 = 190 sites, all 3072→3072 on FLUX.1. Wrapping those Linears
reproduces it without a custom attention processor, so diffusers' own processors (and any LoRA fused
into the base weights) keep working.
"""
from __future__ import annotations

from torch import nn

from trainer.moe_lora import MoELoRAAdapter, MoELoRAConfig, MoELoRALinear

DOUBLE_BLOCK_SITES = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
SINGLE_BLOCK_SITES = ("attn.to_q", "attn.to_k", "attn.to_v")
ADAPTER_ATTR = "moe_lora"


def x2edit_sites(transformer: nn.Module) -> list[str]:
    return ([f"transformer_blocks.{i}.{s}" for i in range(len(transformer.transformer_blocks))
             for s in DOUBLE_BLOCK_SITES]
            + [f"single_transformer_blocks.{i}.{s}" for i in range(len(transformer.single_transformer_blocks))
               for s in SINGLE_BLOCK_SITES])


def inner_dim(transformer: nn.Module) -> int:
    return transformer.config.num_attention_heads * transformer.config.attention_head_dim


def install_moe_lora(transformer: nn.Module, config: MoELoRAConfig = MoELoRAConfig(),
                     sites: list[str] | None = None) -> MoELoRAAdapter:
    """Freeze the transformer, wrap each site's Linear in a `MoELoRALinear` and attach the adapter as
    `transformer.moe_lora`. Only the adapter's parameters are trainable afterwards."""
    if get_adapter(transformer) is not None:
        raise ValueError("this transformer already has an MoE-LoRA; remove_moe_lora() it first")
    if any(getattr(m, "fused_projections", False) for m in transformer.modules()):
        raise ValueError("fused q/k/v projections would bypass the adapter; unfuse_qkv_projections() first")
    sites = x2edit_sites(transformer) if sites is None else list(sites)
    bases = {}
    for site in sites:
        try:
            base = transformer.get_submodule(site)
        except AttributeError:
            raise ValueError(f"site {site!r} does not exist in {type(transformer).__name__}") from None
        if not isinstance(base, nn.Linear):
            raise ValueError(f"site {site!r} is a {type(base).__name__}, not an nn.Linear")
        bases[site] = base

    transformer.requires_grad_(False)
    device = next(iter(bases.values())).weight.device if bases else None
    adapter = MoELoRAAdapter(config, inner_dim(transformer), device=device)
    for site, base in bases.items():
        layer = MoELoRALinear(base, config, adapter.task_embedding.embedding_dim, adapter.current_task)
        transformer.set_submodule(site, layer)
        adapter.sites[site] = layer
    setattr(transformer, ADAPTER_ATTR, adapter)
    adapter.hook = transformer.register_forward_pre_hook(adapter.embed_task)
    return adapter


def get_adapter(transformer: nn.Module) -> MoELoRAAdapter | None:
    return getattr(transformer, ADAPTER_ATTR, None)


def remove_moe_lora(transformer: nn.Module) -> None:
    """Put the original Linears back and detach the adapter (the base weights were never changed)."""
    adapter = get_adapter(transformer)
    if adapter is None:
        raise ValueError("this transformer has no MoE-LoRA installed")
    for site, layer in adapter.sites.items():
        transformer.set_submodule(site, layer.base)
    adapter.hook.remove()
    delattr(transformer, ADAPTER_ATTR)
