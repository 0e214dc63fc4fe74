"""Deterministic mixing: smooth weighted round robin (the nginx scheme).

At every step each name gains its weight and the leader is chosen and pays back the total, so over any
window the picks follow the weights as closely as integers allow, and the sequence is a pure function of
the weights (no state shared between workers, no dependence on processing order).
"""
from __future__ import annotations


def smooth_wrr(weights: dict[str, float], length: int) -> list[str]:
    names = sorted(n for n, w in weights.items() if w > 0)
    if not names:
        raise ValueError("smooth_wrr needs at least one positive weight")
    total = sum(weights[n] for n in names)
    current = dict.fromkeys(names, 0.0)
    picks = []
    for _ in range(length):
        for n in names:
            current[n] += weights[n]
        best = max(names, key=lambda n: current[n])
        current[best] -= total
        picks.append(best)
    return picks


def interleave(groups: dict[str, list]) -> list:
    """All items of all groups, interleaved so every stretch of the output keeps the groups' proportions."""
    order = smooth_wrr({k: len(v) for k, v in groups.items()}, sum(len(v) for v in groups.values()))
    cursors = dict.fromkeys(groups, 0)
    out = []
    for name in order:
        out.append(groups[name][cursors[name]])
        cursors[name] += 1
    return out
