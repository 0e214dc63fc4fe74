"""trainer.edit keeps the input's aspect ratio through the aspect buckets training uses."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")


def test_a_wide_image_is_edited_in_its_1024_px_aspect_bucket(tmp_path):
    from diffusers import FluxTransformer2DModel

    from trainer.adapter_io import save_adapter
    from trainer.data import bucket_for
    from trainer.edit import main
    from trainer.moe_lora import MoELoRAConfig
    from trainer.placement import install_moe_lora
    from trainer.tiny_flux import build_tiny_flux

    base = build_tiny_flux(tmp_path / "tiny", vae_scale_factor=8)  # FLUX's ×8: ~4k tokens per 1 MP image
    transformer = FluxTransformer2DModel.from_pretrained(base, subfolder="transformer")
    install_moe_lora(transformer, MoELoRAConfig(rank=8, alpha=8, num_experts=4))
    save_adapter(transformer, tmp_path / "adapter", base_model_id=str(base))
    Image.fromarray(np.full((500, 1000, 3), 128, np.uint8)).save(tmp_path / "in.jpg")  # 2:1
    out = tmp_path / "out.png"
    main(["--adapter", str(tmp_path / "adapter"), "--image", str(tmp_path / "in.jpg"), "--instruction",
          "Remove the red object", "--out", str(out), "--resolution", "1024", "--steps", "1",
          "--max-sequence-length", "16", "--device", "cpu"])
    assert bucket_for(1000, 500, 1024) == (720, 1456)  # the widest bucket, as training would use
    assert Image.open(out).size == (1456, 720)
