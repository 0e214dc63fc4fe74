"""Rule-based instruction backend: looks at the image with classical tools; for the classical editor it picks
an operation that editor can really perform for the task and writes the instruction from that operation's
parameters (prompts/classical_ops.yaml); for editors that follow instructions it fills a task template
(prompts/task_instructions.yaml). English and Chinese.

Same role as the paper's VLM instruction step (task proposal + bilingual instruction), without a model.
"""
from __future__ import annotations

import string
from functools import lru_cache
from importlib import resources

import numpy as np
import yaml

from workers.base import Editor, Proposal, Subject
from workers.classical import OPS, ops_for_task
from workers.segment_classical import find_subject

VERSION = "rule-1"


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
    fields = _fields(template)
    if fields - ctx.keys():
        raise KeyError(f"template of {op!r} needs {sorted(fields - ctx.keys())}, params give {sorted(ctx)}")
    return template.format(**ctx)


class RuleInstructor:
    """The rule-based Instructor: for an editor that follows instructions, a template of the task
    (prompts/task_instructions.yaml) filled with drawn slots and the subject; any other editor proposes what
    it can really do itself (the classical editor through `propose_classical`)."""

    name = "rule_based"
    version = VERSION

    def __init__(self, min_area: float, max_area: float, cfg: None = None, tasks: tuple[str, ...] = ()):
        """`cfg` and `tasks` (the backend's own block, the tasks routed to instruction-following editors) are
        the Instructor constructor's shape; the rules need neither."""
        self.min_area, self.max_area = min_area, max_area

    def analyze(self, image: np.ndarray) -> Subject | None:
        """The subject that region edits may name, if it passes the mask-area gate."""
        subject = find_subject(image)
        if subject is None or not self.min_area <= subject.area_frac <= self.max_area:
            return None
        return subject

    def propose(self, task: str, editor: Editor, image: np.ndarray, subject: Subject | None,
                rng: np.random.Generator) -> Proposal | None:
        if editor.follows_instructions:
            return _from_template(task, subject, rng)
        return editor.propose(task, image, subject, rng)  # it knows what it can do; the text says just that


def propose_classical(task: str, subject: Subject | None, rng: np.random.Generator) -> Proposal | None:
    """A classical op that can do `task` here, its parameters drawn, the instruction written from them."""
    ops = sorted(ops_for_task(task), key=lambda o: o.name)
    for index in rng.permutation(len(ops)):
        op = ops[index]
        if op.needs_subject and subject is None:
            continue
        params = op.sample_params(rng, subject)
        if params is None:
            continue
        en, zh = render(op.name, params, subject if op.needs_subject else None, int(rng.integers(1 << 30)))
        return Proposal(task, op.name, params, en, zh)
    return None


@lru_cache(maxsize=1)
def task_templates() -> dict:
    return yaml.safe_load(resources.files("prompts").joinpath("task_instructions.yaml").read_text("utf-8"))


def _from_template(task: str, subject: Subject | None, rng: np.random.Generator) -> Proposal | None:
    """A task template whose slots this image can fill; None when the task has none (or all name a subject
    and the image has none)."""
    data = task_templates()
    usable = [t for t in data["tasks"].get(task, [])
              if subject is not None or not {"color", "where"} & _fields(t["en"])]
    if not usable:
        return None
    template = usable[int(rng.integers(len(usable)))]
    params, en_ctx, zh_ctx = {}, {}, {}
    for slot in sorted(_fields(template["en"]) - {"color", "where"}):
        choices = data["slots"][slot]
        word = choices[int(rng.integers(len(choices)))]
        params[slot], en_ctx[slot], zh_ctx[slot] = word["en"], word["en"], word["zh"]
    if subject is not None:
        words = templates()
        en_ctx.update(color=subject.color, where=words["where_en"][subject.where])
        zh_ctx.update(color=words["vocab_zh"][subject.color], where=words["where_zh"][subject.where])
    op = f"{task}.{template['id']}"
    return Proposal(task, op, params, _fill(template["en"], en_ctx, op), _fill(template["zh"], zh_ctx, op))


def _fields(text: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(text) if f}
