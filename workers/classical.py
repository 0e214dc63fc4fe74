"""Registry of the classical CPU edit operations (OpenCV / scikit-image), by name and by task.

Only tasks that some op here really performs are covered; the pipeline reports the others as not covered.
"""
from __future__ import annotations

import cv2
import numpy as np
import skimage

from workers.base import EditOp
from workers.classical_global import GLOBAL_OPS
from workers.classical_region import REGION_OPS

VERSION = "classical-1"  # bump when any op's output changes, so provenance tells old pairs from new

OPS: dict[str, EditOp] = {op.name: op for op in (*GLOBAL_OPS, *REGION_OPS)}
assert len(OPS) == len(GLOBAL_OPS) + len(REGION_OPS), "duplicate op names"
TASKS_COVERED: frozenset[str] = frozenset(op.task for op in OPS.values())


def ops_for_task(task: str) -> list[EditOp]:
    """The ops that perform `task` (canonical task name), in registry order; empty if not covered."""
    return [op for op in OPS.values() if op.task == task]


def versions() -> dict[str, str]:
    """Library versions that determine the ops' output, for provenance records."""
    return {"classical": VERSION, "opencv": cv2.__version__, "scikit-image": skimage.__version__,
            "numpy": np.__version__}
