"""Task balancing on a simulated run: eight tasks with a target of 1/8 each and uneven, unknown acceptance rates
(0.2 … 0.9), the instruct stage's own task choice (smooth weighted round robin, `tasks_per_source` per
sample), seeded Bernoulli acceptance. Open loop (weights = target, as a recipe without `expected_yield`)
against closed loop (manifests/balance.py, weights recomputed each window), side by side in one run:
the largest deviation of an accepted share from its target, in percentage points.

    python -m bench.balance_sim                     # 4,000 samples, windows of 200, 2 tasks per sample
    python -m bench.balance_sim --samples 20000 --window 500
"""
from __future__ import annotations

import argparse

import numpy as np

from manifests.balance import Outcomes, closed_loop_weights
from manifests.mix import smooth_wrr
from stages.instruct import SEQUENCE_LENGTH, preference

YIELDS = {"style_change": 0.9, "tone_transformation": 0.8, "camera_movement": 0.7, "low_level": 0.6,
          "background_change": 0.5, "color_change": 0.4, "subject_removal": 0.3, "subject_addition": 0.2}


def simulate(closed: bool, samples: int, window: int, k: int, seed: int) -> tuple[float, Outcomes]:
    targets = {t: 1 / len(YIELDS) for t in YIELDS}
    outcomes = Outcomes()
    rng = np.random.default_rng(seed)
    for start in range(0, samples, window):
        weights = (closed_loop_weights(targets, outcomes, {}, window * k)[0] if closed else targets)
        sequence = smooth_wrr(weights, SEQUENCE_LENGTH)
        for position in range(start, min(samples, start + window)):
            for task in preference(sequence, position, k)[:k]:
                outcomes.add(task, bool(rng.random() < YIELDS[task]))
    total = sum(outcomes.accepted.values())
    worst = max(abs(outcomes.accepted.get(t, 0) / total - share) for t, share in targets.items())
    return worst * 100, outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--window", type=int, default=200)
    parser.add_argument("--tasks-per-source", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"{args.samples} samples, windows of {args.window}, {args.tasks_per_source} tasks per sample")
    for name, closed in (("open loop", False), ("closed loop", True)):
        worst, outcomes = simulate(closed, args.samples, args.window, args.tasks_per_source, args.seed)
        total = sum(outcomes.accepted.values())
        shares = " ".join(f"{t}={outcomes.accepted.get(t, 0) / total:.3f}" for t in YIELDS)
        print(f"{name:>11}: largest deviation from target {worst:.2f} pp; accepted {total}; {shares}")


if __name__ == "__main__":
    main()
