"""The classical CPU editor behind the Editor interface: runs one honestly named OpenCV/scikit-image op."""
from __future__ import annotations

import numpy as np

from workers import classical
from workers.base import EditOutput, EditRequest


class ClassicalEditor:
    name = "classical"

    def __init__(self):
        self.version = classical.VERSION
        self.versions = classical.versions()

    def covers(self) -> frozenset[str]:
        return classical.TASKS_COVERED

    def edit(self, image: np.ndarray, request: EditRequest) -> EditOutput:
        op = classical.OPS.get(request.op)
        if op is None:
            raise KeyError(f"classical editor has no op {request.op!r}")
        return op.apply(image, request.params, request.subject)
