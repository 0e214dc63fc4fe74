"""Edit stage: run the editor the instruction was written for, record what ran (worker, version, seed)."""
from __future__ import annotations

import json
from typing import Literal

import numpy as np

from manifests.config import Strict
from manifests.images import decode_mask, encode_jpeg, encode_mask
from stages.base import Stage, decode_own
from workers.base import EditRequest, Subject
from workers.classical_editor import ClassicalEditor

EDITORS = {"classical": ClassicalEditor}


class EditConfig(Strict):
    backend: Literal["classical"] = "classical"
    jpeg_quality: int = 95


def subject_from(row: dict) -> Subject | None:
    """Rebuild the subject the instruct stage found (its mask travels as PNG, its description as JSON)."""
    if row["subject"] is None or row["mask"] is None:
        return None
    info = json.loads(row["subject"])
    return Subject(mask=decode_mask(row["mask"]), area_frac=info["area_frac"], bbox=tuple(info["bbox"]),
                   color=info["color"], where=info["where"], saturation=info["saturation"])


class EditStage(Stage):
    name = "edit"
    requires = ("src", "op", "params", "seed")
    adds = ("edited", "editor", "provenance")

    def __init__(self, cfg: EditConfig, ctx):
        super().__init__(cfg, ctx)
        self.editor = EDITORS[cfg.backend]()

    def process_row(self, row: dict) -> list[dict]:
        image = decode_own(row["src"])
        request = EditRequest(op=row["op"], params=json.loads(row["params"]), instruction_en=row["instruction_en"],
                              instruction_zh=row["instruction_zh"], seed=row["seed"], subject=subject_from(row))
        result = self.editor.edit(image, request)
        q = self.cfg.jpeg_quality
        provenance = {**json.loads(row["provenance"] or "{}"),
                      "edit": {"worker": self.editor.name, "version": self.editor.version,
                               "libraries": self.editor.versions, "seed": row["seed"]},
                      "recipe_hash": self.ctx.recipe_hash}
        return [{**row,
                 "src": row["src"] if _same(result.source, image) else encode_jpeg(result.source, q),
                 "edited": encode_jpeg(np.ascontiguousarray(result.edited), q),
                 "mask": None if result.mask is None else encode_mask(result.mask),
                 "editor": f"{self.editor.name}:{row['op']}",
                 "provenance": json.dumps(provenance)}]


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Did the op keep its input as the pair's source? (Reversed pairs build a new one.)"""
    return a is b or (a.shape == b.shape and np.array_equal(a, b))
