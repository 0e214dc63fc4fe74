"""Tiny random-weight checkpoints of the learned scorers' encoders (workers/vision_encoders.py), built like
workers/tiny_models.py's (whose `build_tiny` names their folders): saved with `save_pretrained` and read back
through `from_pretrained`. 32-px images, width 32, two layers: ~200 KB each.

    tiny:siglip-aesthetic    SiglipVisionModel + SiglipImageProcessor + head.safetensors (the released layout)
    tiny:dinov2              Dinov2Model + BitImageProcessor (DINOv2's processor: short side, centre crop)
"""
from __future__ import annotations

from pathlib import Path

import torch

from trainer.tiny_flux import publish
from workers.vision_encoders import HEAD_FILE, aesthetic_head

SIDE, WIDTH = 32, 32
VIT = {"hidden_size": WIDTH, "num_hidden_layers": 2, "num_attention_heads": 2}  # 4×4 patches of 8 px


class _HeadFile:
    """The aesthetic head, which `publish` saves as safetensors under the keys of the released .pth."""

    def __init__(self, head: torch.nn.Module) -> None:
        self.head = head

    def save_pretrained(self, folder: Path) -> None:
        from safetensors.torch import save_file

        save_file({f"scoring_head.{k}": v.contiguous() for k, v in self.head.state_dict().items()},
                  str(folder / HEAD_FILE))


def build_tiny_siglip_aesthetic(path: str | Path, seed: int = 0) -> Path:
    """A SigLIP vision tower (pooled by its attention head, as so400m) with its processor (a plain resize to
    32², as 384² for the real one) and an Aesthetic Predictor V2.5 head of input width 32. Idempotent."""
    path = Path(path)
    if (path / HEAD_FILE).exists():  # written with the rest: a published folder has it
        return path
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    model = SiglipVisionModel(SiglipVisionConfig(image_size=SIDE, patch_size=8, intermediate_size=2 * WIDTH, **VIT))
    processor = SiglipImageProcessor(size={"height": SIDE, "width": SIDE})
    return publish(path, model, processor, _HeadFile(aesthetic_head(WIDTH)))


def build_tiny_dinov2(path: str | Path, seed: int = 0) -> Path:
    """A Dinov2Model with its processor (short side 32, centre crop 32; the real one 256 and 224). Idempotent."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    model = Dinov2Model(Dinov2Config(image_size=SIDE, patch_size=8, mlp_ratio=2, **VIT))
    processor = BitImageProcessor(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE},
                                  do_center_crop=True, image_mean=[0.485, 0.456, 0.406],
                                  image_std=[0.229, 0.224, 0.225])
    return publish(path, model, processor)
