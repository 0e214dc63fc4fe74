"""The classical CPU editor behind the Editor interface: runs the honestly named OpenCV/scikit-image op the
rule-based instructor chose (workers/classical.py), one image at a time."""
from __future__ import annotations

from typing import Literal

import numpy as np

from manifests.config import Strict
from workers import classical
from workers.base import EditOutput, EditRequest, Proposal, Subject
from workers.rule_instructor import propose_classical


class ClassicalEditor:
    backend = "classical"
    follows_instructions = False

    class Config(Strict):
        backend: Literal["classical"] = "classical"

    def __init__(self, cfg: Config | None = None):
        self.cfg = cfg or self.Config()

    def covers(self) -> frozenset[str]:
        return classical.TASKS_COVERED

    def propose(self, task: str, image: np.ndarray, subject: Subject | None,
                rng: np.random.Generator) -> Proposal | None:
        return propose_classical(task, subject, rng)

    def edit(self, images: list[np.ndarray], requests: list[EditRequest]) -> list[EditOutput]:
        return [self._one(image, request) for image, request in zip(images, requests)]

    def _one(self, image: np.ndarray, request: EditRequest) -> EditOutput:
        op = classical.OPS.get(request.op)
        if op is None:
            raise KeyError(f"classical editor has no op {request.op!r}")
        return op.apply(image, request.params, request.subject)

    def provenance(self) -> dict:
        return {"worker": self.backend, "version": classical.VERSION, "libraries": classical.versions()}
