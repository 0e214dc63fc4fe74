"""Learned scorer throughput: the learned scorers of a recipe's score stage (aesthetic_v2_5, dino, clip; the VLM
judges are left out), each on the same pairs at several batch sizes, side by side in one run. Reported in pairs
per second (a pair is two images, the source and the edit, and for clip one instruction), best of the repeats,
the model loaded and warmed before any timing.

    python -m bench.scorers                           # tiny-models: tiny random-weight encoders on this machine
    python -m bench.scorers --pairs 64 --batch-sizes 1 4 16 64
    python -m bench.scorers --recipe my-gpu.yaml      # a recipe whose score stage names the real checkpoints
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from filters.learned import LearnedScorer
from filters.vlm_judges import EditPair
from pipeline.recipe import load_recipe
from stages.score import SCORERS
from stages.source import resize_short_side
from workers.sample_images import generate_scene


def edit_pairs(n: int, short_side: int) -> list[EditPair]:
    """Generated scenes at the recipe's working size, each with its object inverted: an edit a scorer sees."""
    out = []
    for i in range(n):
        image, mask = generate_scene(i % 64)
        edited = image.copy()
        edited[mask] = 255 - edited[mask]
        src, edited = (np.array(resize_short_side(x, short_side)) for x in (image, edited))  # writable, as decoded
        out.append(EditPair(src, edited, "Invert the colours of the main object", None))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="tiny-models")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    scorers = {name: SCORERS[cfg.backend](cfg) for name, cfg in recipe.score.scorers.items()
               if issubclass(SCORERS[cfg.backend], LearnedScorer)}
    if not scorers:
        raise SystemExit(f"recipe {args.recipe!r} has no learned scorer in score.scorers")
    pairs = edit_pairs(args.pairs, recipe.source.work_short_side)
    for scorer in scorers.values():
        scorer.score(pairs[:max(args.batch_sizes)])  # loads the model and warms its kernels: in no figure
    best = {(name, b): float("inf") for name in scorers for b in args.batch_sizes}
    for _ in range(args.repeats):  # interleaved, best of each: the machine's noise hits every cell alike
        for name, scorer in scorers.items():
            for b in args.batch_sizes:
                scorer.cfg = scorer.cfg.model_copy(update={"batch_size": b})
                start = time.perf_counter()
                scorer.score(pairs)
                best[name, b] = min(best[name, b], time.perf_counter() - start)
    print(f"\n{len(pairs)} pairs at short side {recipe.source.work_short_side} px, recipe {args.recipe}, "
          f"best of {args.repeats}; pairs/s by batch size (pairs per forward pass)\n")
    print("| scorer | model | device | " + " | ".join(f"batch {b}" for b in args.batch_sizes) + " |")
    print("|---|---|---|" + "---:|" * len(args.batch_sizes))
    for name, scorer in scorers.items():
        made = scorer.provenance()
        cells = " | ".join(f"{len(pairs) / best[name, b]:.1f}" for b in args.batch_sizes)
        print(f"| {name} ({scorer.backend}) | {made['model']} | {made['device']} {made['dtype']} | {cells} |")


if __name__ == "__main__":
    main()
