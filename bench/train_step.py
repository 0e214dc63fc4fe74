"""A training step of the tiny FLUX with the MoE-LoRA (CPU): VAE + text encoding, the transformer with the
reference tokens, flow matching + task InfoNCE, backward, AdamW; seconds per step after the first.

    python -m bench.train_step [--steps 20]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from trainer.config import TrainConfig
from trainer.tiny_flux import build_tiny_flux, write_random_corpus
from trainer.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_random_corpus(root / "corpus-000000.tar", pairs=48)
        cfg = TrainConfig(base=str(build_tiny_flux(root / "tiny")), data=[str(root / "*.tar")],
                          out_dir=str(root / "out"), resolution=args.resolution, steps=args.steps,
                          adapter={"rank": 8, "alpha": 8, "experts": 4}, max_sequence_length=32,
                          checkpoint_every=10**6)
        start = time.perf_counter()
        train(cfg.model_copy(update={"steps": 1}))
        first = time.perf_counter() - start
        start = time.perf_counter()
        train(cfg)  # resumes after step 1
        rest = time.perf_counter() - start
    print(f"tiny FLUX training step ({args.resolution} px, global batch 4): {rest / (args.steps - 1) * 1e3:.0f} ms "
          f"per step (start-up + first step {first:.1f} s)")


if __name__ == "__main__":
    main()
