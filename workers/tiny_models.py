"""Tiny random-weight checkpoints of the model workers' families, built offline at first use and saved with
`save_pretrained`, so tests and the CPU runs load them through the same `from_pretrained` path as a real
checkpoint. The parts come from the trainer's tiny FLUX (trainer/tiny_flux.py): one builder for both.

    python -m workers.tiny_models            # builds them into $X2EDIT_TINY_MODELS (default: models/)
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from trainer.tiny_flux import flux_components, publish

TINY_MODELS_ENV = "X2EDIT_TINY_MODELS"
DEFAULT_DIR = Path(__file__).resolve().parents[1] / "models"  # gitignored


def tiny_models_dir() -> Path:
    return Path(os.environ.get(TINY_MODELS_ENV) or DEFAULT_DIR)


def build_tiny_kontext(path: str | Path | None = None, seed: int = 0) -> Path:
    """A FluxKontextPipeline with FLUX.1's classes at widths of 32 (VAE ×2: a 64-px image is 256 tokens).
    Idempotent: an existing build is reused; a concurrent or killed build leaves no half folder."""
    path = Path(path) if path else tiny_models_dir() / "tiny-flux-kontext"
    if (path / "model_index.json").exists():
        return path
    from diffusers import FluxKontextPipeline

    return publish(path, FluxKontextPipeline(**flux_components(seed)))


if __name__ == "__main__":
    print(build_tiny_kontext(sys.argv[1] if len(sys.argv) > 1 else None))
