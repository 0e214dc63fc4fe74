"""Bundled trainer: MoE-LoRA on a frozen FLUX.1 transformer (X2Edit). Imports only `manifests` from the
project, plus torch, diffusers and safetensors."""
from trainer.adapter_io import load_adapter, read_adapter_config, save_adapter
from trainer.moe_lora import MoELoRAAdapter, MoELoRAConfig, MoELoRALinear, moe_lora_delta
from trainer.placement import get_adapter, install_moe_lora, remove_moe_lora, x2edit_sites

__all__ = ["MoELoRAAdapter", "MoELoRAConfig", "MoELoRALinear", "get_adapter", "install_moe_lora", "load_adapter",
           "moe_lora_delta", "read_adapter_config", "remove_moe_lora", "save_adapter", "x2edit_sites"]
