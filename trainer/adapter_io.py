"""Adapter export and load: `adapter.safetensors` + `adapter_config.json` in one directory.

diffusers' `load_lora_weights` format has no place for experts or gates (anchors-trainer.md §2), so the
adapter has its own. Tensor names are the transformer's site names plus the parameter, e.g.
`transformer_blocks.0.attn.to_q.experts_down` (E, R, I), `.experts_up` (E, O, R), `.shared_down` (R, I),
`.shared_up` (O, R), `.gate` (E, I + C), and `task_embedding.weight` (tasks, C). The config records what is
needed to rebuild the layers, the sites, and the base model the adapter was trained on. Any FLUX.1 variant
with the same widths and blocks (dev, schnell, Fill, Kontext, fine-tunes) takes it.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from trainer.distributed import full_tensor
from trainer.moe_lora import MoELoRAAdapter, MoELoRAConfig
from trainer.placement import get_adapter, inner_dim, install_moe_lora, remove_moe_lora

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "x2edit-moe-lora"
FORMAT_VERSION = 1


def save_adapter(model: nn.Module, directory: str | Path, base_model_id: str,
                 dtype: torch.dtype | None = None, write: bool = True) -> Path:
    """Write the adapter of `model` (a transformer carrying one, or the adapter itself); `dtype` casts the
    tensors on the way out (e.g. torch.bfloat16 halves the 3.9 GB of an fp32 FLUX.1 adapter). An FSDP-sharded
    adapter is gathered: every process calls this, and only the one with `write` writes."""
    adapter = model if isinstance(model, MoELoRAAdapter) else get_adapter(model)
    if adapter is None:
        raise ValueError(f"{type(model).__name__} carries no MoE-LoRA adapter")
    directory = Path(directory)
    tensors = {name: full_tensor(p.detach()) for name, p in adapter.named_adapter_parameters()}
    if not write:
        return directory
    tensors = {name: t.to("cpu", dtype or t.dtype).contiguous() for name, t in tensors.items()}
    directory.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "base_model_id": base_model_id,
              **dataclasses.asdict(adapter.config), "task_dim": adapter.task_embedding.embedding_dim,
              "sites": list(adapter.sites)}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": FORMAT})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def read_adapter_config(directory: str | Path) -> dict:
    config = json.loads((Path(directory) / CONFIG_NAME).read_text())
    if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{directory}: not an {FORMAT} v{FORMAT_VERSION} adapter "
                         f"(format={config.get('format')!r}, version={config.get('format_version')!r})")
    return config


def load_adapter(transformer: nn.Module, directory: str | Path,
                 expect: MoELoRAConfig | None = None) -> MoELoRAAdapter:
    """Install the saved adapter into `transformer` (frozen afterwards, adapter trainable) and return it;
    with `expect`, its rank, experts, ... must be those (checked before any weight is read). On any mismatch
    the transformer is left as it was and the error names the offending key."""
    config = read_adapter_config(directory)
    if config["task_dim"] != inner_dim(transformer):
        raise ValueError(f"task_embedding.weight: adapter width {config['task_dim']} != transformer width "
                         f"{inner_dim(transformer)}; it was trained on {config['base_model_id']!r}")
    fields = {f.name for f in dataclasses.fields(MoELoRAConfig)}
    saved = MoELoRAConfig(**{k: v for k, v in config.items() if k in fields})
    if expect is not None and saved != expect:
        raise ValueError(f"{directory}: the adapter is {saved}, this run wants {expect}")
    adapter = install_moe_lora(transformer, saved, sites=config["sites"])
    try:
        _fill(adapter, Path(directory) / WEIGHTS_NAME)
    except Exception:
        remove_moe_lora(transformer)
        raise
    return adapter


def _fill(adapter: MoELoRAAdapter, path: Path) -> None:
    params = dict(adapter.named_adapter_parameters())
    with safe_open(str(path), framework="pt", device="cpu") as f:
        stored = set(f.keys())
        missing, unexpected = sorted(params.keys() - stored), sorted(stored - params.keys())
        if missing or unexpected:
            raise ValueError(f"{path}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
        for name, param in params.items():  # every shape first: no GBs loaded for a doomed adapter
            shape = tuple(f.get_slice(name).get_shape())
            if shape != tuple(param.shape):
                raise ValueError(f"{name}: stored shape {shape} != this transformer's {tuple(param.shape)}")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(f.get_tensor(name))  # to the parameter's device and dtype
