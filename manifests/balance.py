"""Closed-loop task balancing: the next window's attempt weights from the outcomes committed so far.

Open loop, a task is attempted in proportion to target share / expected yield, and any error in the expected
yield shows up in the corpus. Closed loop, the run proceeds in windows; before each window the yield of every
task is estimated from what earlier windows made of it (accepted / attempted, shrunk towards the recipe's
expected yield while there is little evidence), and the window's attempts go where the accepted counts fall
short of the target: enough attempts of a task to bring it to its share of the corpus expected after the
window. The weights are a pure function of the committed outcomes, so a resumed run computes the same ones.
"""
from __future__ import annotations

from dataclasses import dataclass, field

MIN_YIELD = 0.02  # a task that never passed is still tried, and its weight stays finite
PRIOR_STRENGTH = 4.0  # the expected yield counts as this many attempts of evidence
FLOOR = 0.02  # every task keeps this share of its open-loop weight, so a sample can still fall back to it


@dataclass
class Outcomes:
    """Per task: pairs attempted (scored) and accepted, over the windows committed so far."""

    attempted: dict[str, int] = field(default_factory=dict)
    accepted: dict[str, int] = field(default_factory=dict)

    def add(self, task: str, accepted: bool) -> None:
        self.attempted[task] = self.attempted.get(task, 0) + 1
        self.accepted[task] = self.accepted.get(task, 0) + int(accepted)


def yield_estimate(task: str, outcomes: Outcomes, prior: float) -> float:
    attempted, accepted = outcomes.attempted.get(task, 0), outcomes.accepted.get(task, 0)
    return max(MIN_YIELD, (accepted + PRIOR_STRENGTH * prior) / (attempted + PRIOR_STRENGTH))


def closed_loop_weights(targets: dict[str, float], outcomes: Outcomes, priors: dict[str, float],
                        window_attempts: int) -> tuple[dict[str, float], dict[str, float]]:
    """(attempt weights for the next window, the yield estimates they assume). `targets` are shares summing to
    1; `window_attempts` is about how many pairs the window will try."""
    yields = {t: yield_estimate(t, outcomes, priors.get(t, 1.0)) for t in targets}
    # Attempts split as target / yield make accepted pairs in the target mix; this many per window:
    expected_accepted = window_attempts / sum(share / yields[t] for t, share in targets.items())
    goal = sum(outcomes.accepted.get(t, 0) for t in targets) + expected_accepted
    short = {t: max(0.0, share * goal - outcomes.accepted.get(t, 0)) for t, share in targets.items()}
    if not any(short.values()):  # exactly on target: keep it there
        short = {t: share * expected_accepted for t, share in targets.items()}
    weights = {t: max(short[t], FLOOR * targets[t] * expected_accepted) / yields[t] for t in targets}
    return weights, yields
