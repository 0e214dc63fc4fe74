"""Rule-based instruction backend: looks at the image with classical tools, picks an operation the
classical editors can really perform for each requested task, and writes the instruction from that
operation's parameters in English and Chinese (templates in prompts/classical_ops.yaml).

Same role as the paper's VLM instruction step (task proposal + bilingual instruction), without a model.
"""
from __future__ import annotations

import string
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable
from importlib import resources

import numpy as np
import yaml

from workers.base import Subject
from workers.classical import OPS, ops_for_task
from workers.segment_classical import find_subject

VERSION = "rule-1"


@dataclass(frozen=True)
class Proposal:
    task: str
    op: str
    params: dict
    instruction_en: str
    instruction_zh: str


@lru_cache(maxsize=1)
def templates() -> dict:
    data = yaml.safe_load(resources.files("prompts").joinpath("classical_ops.yaml").read_text("utf-8"))
    missing = sorted(set(OPS) - set(data["ops"]))
    if missing:
        raise KeyError(f"prompts/classical_ops.yaml has no templates for ops {missing}")
    return data


def render(op: str, params: dict, subject: Subject | None, variant: int) -> tuple[str, str]:
    """The (English, Chinese) instruction for an op with these parameters."""
    data = templates()
    choice = data["ops"][op][variant % len(data["ops"][op])]
    en_ctx = {k: v for k, v in params.items()}
    zh_ctx = {k: data["vocab_zh"].get(v, v) if isinstance(v, str) else v for k, v in params.items()}
    if subject is not None:
        en_ctx.update(color=subject.color, where=data["where_en"][subject.where])
        zh_ctx.update(color=data["vocab_zh"][subject.color], where=data["where_zh"][subject.where])
    return _fill(choice["en"], en_ctx, op), _fill(choice["zh"], zh_ctx, op)


def _fill(template: str, ctx: dict, op: str) -> str:
    fields = {f for _, f, _, _ in string.Formatter().parse(template) if f}
    if fields - ctx.keys():
        raise KeyError(f"template of {op!r} needs {sorted(fields - ctx.keys())}, params give {sorted(ctx)}")
    return template.format(**ctx)


class RuleInstructor:
    name = "rule_based"
    version = VERSION

    def __init__(self, min_area: float, max_area: float):
        self.min_area, self.max_area = min_area, max_area

    def analyze(self, image: np.ndarray) -> Subject | None:
        """The subject that region edits may name, if it passes the mask-area gate."""
        subject = find_subject(image)
        if subject is None or not self.min_area <= subject.area_frac <= self.max_area:
            return None
        return subject

    def propose(self, subject: Subject | None, tasks: list[str], k: int,
                rng_for: Callable[[str], np.random.Generator]) -> list[Proposal]:
        """Instructions for the first k tasks (in the given preference order) that an op can honestly do."""
        out = []
        for task in tasks:
            if len(out) == k:
                break
            rng: np.random.Generator = rng_for(task)
            ops = sorted(ops_for_task(task), key=lambda o: o.name)
            for index in rng.permutation(len(ops)):
                op = ops[index]
                if op.needs_subject and subject is None:
                    continue
                params = op.sample_params(rng, subject)
                if params is None:
                    continue
                en, zh = render(op.name, params, subject if op.needs_subject else None, int(rng.integers(1 << 30)))
                out.append(Proposal(task, op.name, params, en, zh))
                break
        return out
