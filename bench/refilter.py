"""Re-filtering a finished run vs re-scoring it: `python -m bench.refilter [--pairs 100000]`.

Synthesises a finished run of N pairs (real score-stage fragments and completion record, tiny JPEGs, the score
mix of a run: most pairs accepted, the rest rejected by the policy with their images kept), re-filters it under
a tighter policy (`python -m pipeline refilter`'s code: re-decide every row, re-pack the shards, ledger, reports)
and measures, side by side in this run, what re-scoring the same pairs would cost: the score stage on a sample
of 512² pairs with the heuristics alone and with the tiny-models recipe's learned scorers (tiny random-weight
models: a floor for the real ones, which are orders of magnitude heavier), extrapolated to N pairs.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from manifests.images import encode_jpeg
from manifests.schema import LIVE, REJECTED, empty_row, make_pair_id
from manifests.fragments import write_fragment
from pipeline.recipe import load_recipe
from pipeline.run import prepare_run_dir
from pipeline.stage_state import finish, stage_dir
from stages.base import StageContext, to_table
from stages.score import ScoreConfig, ScoreStage

TASKS = ("style_change", "tone_transformation", "background_change", "color_change", "camera_movement",
         "low_level")
ROWS_PER_FRAGMENT = 2000


def synthesise(run_dir: Path, pairs: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    recipe = load_recipe("default-cpu")
    prepare_run_dir(recipe, run_dir)
    images = [encode_jpeg(rng.integers(0, 255, (32, 32, 3), np.uint8)) for _ in range(16)]
    for start in range(0, pairs, ROWS_PER_FRAGMENT):
        rows = []
        for i in range(start, min(pairs, start + ROWS_PER_FRAGMENT)):
            task, change = TASKS[i % len(TASKS)], float(rng.uniform(0, 0.2))
            sample = f"s{i:08d}"
            pair = make_pair_id(sample, task, i, "classical")
            live = change >= 0.01
            rows.append({**empty_row(), "unit_id": pair, "sample_id": sample, "fanout": 1, "pair_id": pair,
                         "status": LIVE if live else REJECTED, "stage": None if live else "score",
                         "reason": None if live else "no_op_edit", "message": None if live else "synthetic",
                         "warnings": [], "source_uri": f"synthetic://{sample}", "position": i, "source_meta": "{}",
                         "src": images[i % 16], "edited": images[(i + 1) % 16], "width": 32, "height": 32,
                         "task": task, "task_id": 0, "op": "synthetic", "params": "{}", "seed": i,
                         "instruction_en": "Make it different", "instruction_zh": "改一下", "editor": "classical",
                         "provenance": "{}", "scores": json.dumps({"change_global": change}), "thresholds": "[]"})
        write_fragment(stage_dir(run_dir, "score"), to_table(rows))
    finish(run_dir, "score")


def rescoring_seconds_per_pair(sample: int, side: int = 512) -> dict[str, float]:
    """The score stage on `sample` pairs of side² images (the default recipe's working size; re-scoring decodes
    and measures pixels, re-filtering never does): heuristics alone, then with the tiny learned scorers."""
    rng = np.random.default_rng(1)
    ramp = np.linspace(0, 200, side, dtype=np.float32)[None, :, None]
    images = [encode_jpeg((ramp + rng.normal(0, 20, (side, side, 3))).clip(0, 255).astype(np.uint8))
              for _ in range(4)]
    rows = [{**empty_row(), "unit_id": str(i), "src": images[i % 4], "edited": images[(i + 1) % 4],
             "task": TASKS[i % len(TASKS)], "instruction_en": "Make it different", "instruction_zh": "改一下",
             "scores": "{}", "warnings": []} for i in range(sample)]
    learned = {n: c for n, c in load_recipe("tiny-models").score.scorers.items() if c.backend != "imgedit_judge"}
    out = {}
    for name, scorers in (("heuristics", {}), (f"heuristics + {', '.join(learned)} (tiny models)", learned)):
        stage = ScoreStage(ScoreConfig(scorers=scorers), StageContext(seed=0, recipe_hash="bench", run_dir="."))
        stage.process(rows[:2])  # load the models outside the timing
        start = time.perf_counter()
        stage.process(rows)
        out[name] = (time.perf_counter() - start) / len(rows)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--rescore-sample", type=int, default=256)
    args = parser.parse_args()
    from pipeline.refilter import refilter

    root = Path(tempfile.mkdtemp(prefix="x2edit-bench-refilter-"))
    try:
        start = time.perf_counter()
        synthesise(root / "run", args.pairs)
        made = time.perf_counter() - start
        tight = root / "tight.yaml"
        tight.write_text(json.dumps({"name": "tight", "score": {
            "rules": [{"score": "change_global", "min": 0.05, "reason": "no_op_edit"}]}}))
        start = time.perf_counter()
        diff = refilter(str(root / "run"), str(tight), str(root / "tight"))
        took = time.perf_counter() - start
        per_pair = rescoring_seconds_per_pair(args.rescore_sample)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n## Refilter vs re-scoring, {args.pairs:,} pairs (synthesised in {made:.0f} s)\n")
    print("| what | seconds | × refilter |\n|---|---:|---:|")
    print(f"| refilter (re-decide + re-pack {diff['accepted_after']:,} pairs + ledger + reports) | {took:.1f} | 1.0 |")
    for name, seconds in per_pair.items():
        total = seconds * args.pairs
        print(f"| re-score: {name}, {seconds * 1000:.2f} ms/pair × {args.pairs:,} | {total:.0f} | {total / took:.1f} |")


if __name__ == "__main__":
    main()
