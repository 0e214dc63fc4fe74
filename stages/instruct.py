"""Instruct stage: choose tasks for each source sample from the recipe's target mix, route each to one of
the editors the recipe gives that task, and write bilingual instructions for that editor. One source sample
becomes up to `tasks_per_source` candidate pairs. The tasks drawn are those the edit routes cover.

Balancing is deterministic so that a killed and restarted run makes exactly the same pairs: the tasks'
weights (target share / expected yield, so tasks that are often rejected are tried more) define a smooth
weighted round-robin sequence, and a sample at input position p takes its preference order from the
sequence starting at p·k. Any run of consecutive samples therefore follows the target mix, and a task a
sample cannot do (no subject for a removal, a grey subject for a recolour) passes to the next task in line.
A task's editor is a weighted draw seeded by the sample and the task (stages/edit.py `editor_order`); when
the drawn editor cannot make the pair, the task's next editor is asked. The editor is part of the pair id.
"""
from __future__ import annotations

import json
from typing import Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from manifests.balance import Outcomes, closed_loop_weights
from manifests.config import Strict
from manifests.images import encode_mask
from manifests.mix import smooth_wrr
from manifests.rejected import Rejected
from manifests.schema import LIVE, REJECTED, make_pair_id, stable_seed
from manifests.taxonomy import task_by_name
from stages.base import Stage, decode_own, end_row
from stages.edit import EditConfig, editor_order
from workers.base import Instructor
from workers.rule_instructor import RuleInstructor
from workers.vlm_instructor import InstructionRejected, VlmInstructConfig, VlmInstructor

INSTRUCTORS: dict[str, type[Instructor]] = {cls.name: cls for cls in (RuleInstructor, VlmInstructor)}

SEQUENCE_LENGTH = 1009  # prime, so positions p·k wrap around the whole sequence


class SubjectGate(Strict):
    min_area: float = Field(0.02, ge=0, le=1)  # reference deletion script: mask covers 2–35 % of the image
    max_area: float = Field(0.35, ge=0, le=1)


class Balance(Strict):
    """open_loop: attempts split as target / expected yield, fixed. closed_loop: the fused run proceeds in
    windows of `window` input read units, and each window's split comes from the accepted and rejected pairs
    of the earlier windows (manifests/balance.py), so the accepted mix follows the target whatever the yields."""

    mode: Literal["open_loop", "closed_loop"] = "open_loop"
    window: int = Field(4, ge=1)


class InstructConfig(Strict):
    backend: str = "rule_based"  # a name in INSTRUCTORS
    tasks_per_source: int = Field(3, ge=1, le=15)
    target_mix: dict[str, float] = {}  # task → weight; empty = equal over the tasks the editor covers
    expected_yield: dict[str, float] = {}  # task → expected acceptance rate in (0, 1]
    subject: SubjectGate = SubjectGate()
    balance: Balance = Balance()
    vlm: VlmInstructConfig | None = None  # the VLM instructor's block (backend: vlm)

    @model_validator(mode="after")
    def _backend_block(self):
        if (self.backend == VlmInstructor.name) != (self.vlm is not None):
            raise ValueError("instruct.vlm is needed with backend: vlm, and only with it")
        return self

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str):
        if v not in INSTRUCTORS:
            raise ValueError(f"unknown instruction backend {v!r}; known: {sorted(INSTRUCTORS)}")
        return v

    @field_validator("target_mix", "expected_yield")
    @classmethod
    def _tasks(cls, v: dict[str, float]):
        for name, w in v.items():
            task_by_name(name)
            if w < 0:
                raise ValueError(f"weight for {name!r} must be >= 0, got {w}")
        return v


def target_shares(cfg: InstructConfig, covered: frozenset[str]) -> dict[str, float]:
    """The share of accepted pairs the recipe asks for, per covered task (what a report compares against)."""
    mix = {t: w for t, w in (cfg.target_mix or dict.fromkeys(covered, 1.0)).items() if t in covered}
    total = sum(mix.values())
    if total <= 0:
        raise ValueError(f"no task of the target mix {sorted(cfg.target_mix)} is covered by the editor "
                         f"({sorted(covered)})")
    return {t: w / total for t, w in mix.items()}


def task_weights(cfg: InstructConfig, covered: frozenset[str]) -> dict[str, float]:
    """How often each task is attempted: its target share / expected yield, so tasks the policy often
    rejects are tried more and the accepted mix comes out near the target."""
    return {t: share / max(cfg.expected_yield.get(t, 1.0), 1e-3) for t, share in target_shares(cfg, covered).items()}


def window_weights(cfg: InstructConfig, covered: frozenset[str], scored: list[dict], units_before: int,
                   units_in_window: int) -> tuple[dict[str, float], dict[str, float]]:
    """Closed loop: (attempt weights, yield estimates) for the next window from the scored rows of the earlier
    windows (task, status). A pair counts as accepted when the score stage left it live."""
    outcomes = Outcomes()
    for row in scored:
        if row["task"] is not None:
            outcomes.add(row["task"], row["status"] == LIVE)
    attempted = sum(outcomes.attempted.values())
    per_unit = attempted / units_before if attempted else cfg.tasks_per_source
    return closed_loop_weights(target_shares(cfg, covered), outcomes, cfg.expected_yield, per_unit * units_in_window)


def preference(sequence: list[str], position: int, k: int) -> list[str]:
    """Tasks in the order a sample at this position should try them (each task once)."""
    order: list[str] = []
    start = position * k
    for i in range(len(sequence)):
        task = sequence[(start + i) % len(sequence)]
        if task not in order:
            order.append(task)
    return order


class InstructStage(Stage):
    name = "instruct"
    requires = ("src", "position")
    adds = ("pair_id", "task", "task_id", "op", "params", "instruction_en", "instruction_zh", "seed", "editor")

    def __init__(self, cfg: tuple[InstructConfig, EditConfig], ctx, weights: dict[str, float] | None = None):
        """`cfg`: the instruct and edit blocks; `weights`: this window's task weights (closed loop), else the
        open-loop ones."""
        super().__init__(cfg, ctx)
        self.instruct_cfg, edit_cfg = cfg
        self.routes, self.editors = edit_cfg.routes(), edit_cfg.build()
        weights = weights or task_weights(self.instruct_cfg, frozenset(self.routes))
        self.sequence = smooth_wrr(weights, SEQUENCE_LENGTH)
        gate, backend = self.instruct_cfg.subject, self.instruct_cfg.backend
        asked = tuple(t for t, names in self.routes.items() if any(self.editors[n].follows_instructions for n in names))
        block = getattr(self.instruct_cfg, backend, None)  # a backend's own block is named after it (`vlm:`)
        self.worker = INSTRUCTORS[backend](gate.min_area, gate.max_area, block, asked)

    def process_row(self, row: dict) -> list[dict]:
        image = decode_own(row["src"])
        subject = self.worker.analyze(image)
        k = self.instruct_cfg.tasks_per_source
        sample_seed = stable_seed(self.ctx.seed, row["sample_id"])
        proposals, ended = [], []
        for task in preference(self.sequence, row["position"], k):
            if len(proposals) + len(ended) == k:
                break
            rng = np.random.default_rng(stable_seed(sample_seed, task))
            order = editor_order(self.routes[task], np.random.default_rng(stable_seed(sample_seed, task, "editor")))
            for name in order:
                try:
                    p = self.worker.propose(task, self.editors[name], image, subject, rng)
                except Rejected as e:  # this candidate's instruction failed its checks: it ends alone, counted in k
                    ended.append((name, task, e))
                    break
                if p is not None:
                    proposals.append((name, p))
                    break
        if not proposals and not ended:
            return [end_row(row, REJECTED, self.name, "no_eligible_task",
                            "no configured editor can do any task of the target mix on this image")]
        fanout = len(proposals) + len(ended)
        out = [self._ended(row, sample_seed, fanout, *candidate) for candidate in ended]
        for name, p in proposals:
            about = p.subject or subject
            subject_json = None if about is None else json.dumps(
                {"color": about.color, "where": about.where, "area_frac": round(about.area_frac, 4),
                 "bbox": list(about.bbox), "saturation": round(about.saturation, 4)})
            seed = stable_seed(sample_seed, p.task, p.op)
            editor = f"{name}:{p.op}"
            pair_id = make_pair_id(row["sample_id"], p.task, seed, editor)
            task = task_by_name(p.task)
            out.append({**row, "unit_id": pair_id, "pair_id": pair_id, "fanout": fanout,
                        "task": task.name, "task_id": task.id, "op": p.op, "params": json.dumps(p.params),
                        "instruction_en": p.instruction_en, "instruction_zh": p.instruction_zh,
                        "seed": seed, "subject": subject_json, "editor": editor,
                        "mask": None if about is None else encode_mask(about.mask),
                        "provenance": json.dumps({"instruct": {"worker": self.worker.name,
                                                               "version": self.worker.version}})})
        return out

    def _ended(self, row: dict, sample_seed: int, fanout: int, name: str, task_name: str, error: Rejected) -> dict:
        """A candidate pair whose instruction was rejected: its own unit, with the reason and the instructor's
        trace (attempts, critiques) in its provenance."""
        seed = stable_seed(sample_seed, task_name)
        pair_id = make_pair_id(row["sample_id"], task_name, seed, name)
        task = task_by_name(task_name)
        trace = error.provenance if isinstance(error, InstructionRejected) else {}
        provenance = {"instruct": {"worker": self.worker.name, "version": self.worker.version, **trace}}
        return end_row({**row, "unit_id": pair_id, "pair_id": pair_id, "fanout": fanout, "task": task.name,
                        "task_id": task.id, "seed": seed, "editor": name, "provenance": json.dumps(provenance)},
                       REJECTED, self.name, error.reason, error.message)

