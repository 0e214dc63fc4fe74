"""Edit stage: each pair goes to the editor the instruct stage routed it to (the `editor` column,
"<editor name>:<op>"); pairs of one editor are edited as a batch; what ran (worker, model, settings, seed)
is recorded in the pair's provenance.

The recipe names editor instances and routes tasks to them with weights:

    edit:
      editors:
        classical: {backend: classical}
        kontext: {backend: diffusers, model: black-forest-labs/FLUX.1-Kontext-dev, tasks: [style_change]}
      route:
        style_change: {kontext: 3, classical: 1}

Without `route`, every task an editor covers goes to the editors that cover it, with equal weights.
Backends are found by name in EDITORS; adding one touches its own file and the registry line.
"""
from __future__ import annotations

import json
from collections import defaultdict
from typing import Annotated, Union

import numpy as np
from pydantic import Field, field_validator, model_validator

from manifests.config import Strict
from manifests.images import decode_mask, encode_jpeg, encode_mask
from manifests.rejected import ItemFailed, Rejected
from manifests.schema import FAILED, REJECTED
from manifests.taxonomy import task_by_name
from stages.base import Stage, decode_own, end_row
from workers.api_editor import ApiEditor
from workers.base import EditOutput, EditRequest, Editor, Subject
from workers.classical_editor import ClassicalEditor
from workers.diffusers_editor import DiffusersEditor
from workers.expert_removal import ExpertRemovalEditor
from workers.text_editor import TextEditor

EDITORS: dict[str, type[Editor]] = {cls.backend: cls for cls in (ClassicalEditor, DiffusersEditor, ApiEditor,
                                                               TextEditor, ExpertRemovalEditor)}
_CONFIGS = tuple(cls.Config for cls in EDITORS.values())
EditorConfig = Annotated[Union[_CONFIGS], Field(discriminator="backend")] if len(_CONFIGS) > 1 else _CONFIGS[0]


class EditConfig(Strict):
    editors: dict[str, EditorConfig] = {"classical": ClassicalEditor.Config()}
    route: dict[str, dict[str, float]] = {}  # task → {editor name: weight}
    jpeg_quality: int = Field(95, ge=50, le=100)

    @field_validator("editors")
    @classmethod
    def _names(cls, v: dict):
        if not v:
            raise ValueError("at least one editor is needed")
        for name in v:
            if not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"editor name {name!r}: letters, digits, '_' and '-' only (it is part of pair ids)")
        return v

    @model_validator(mode="after")
    def _route(self):
        covers = {name: editor.covers() for name, editor in self.build().items()}
        for task, weights in self.route.items():
            task_by_name(task)
            if not weights or not any(w > 0 for w in weights.values()):
                raise ValueError(f"route.{task}: needs at least one editor with a weight > 0")
            for name, weight in weights.items():
                if name not in covers:
                    raise ValueError(f"route.{task}: no editor named {name!r} (editors: {sorted(covers)})")
                if weight < 0:
                    raise ValueError(f"route.{task}.{name}: weight must be >= 0, got {weight}")
                if task not in covers[name]:
                    raise ValueError(f"route.{task}: editor {name!r} does not cover {task!r} "
                                     f"(it covers {sorted(covers[name])})")
        return self

    def build(self) -> dict[str, Editor]:
        """The configured editors; cheap (models load on their first edit)."""
        return {name: EDITORS[cfg.backend](cfg) for name, cfg in self.editors.items()}

    def routes(self) -> dict[str, dict[str, float]]:
        """task → {editor name: weight} of every task some editor is routed to (what the recipe covers)."""
        if self.route:
            return {task: {n: w for n, w in weights.items() if w > 0} for task, weights in self.route.items()}
        routes: dict[str, dict[str, float]] = defaultdict(dict)
        for name, editor in self.build().items():
            for task in editor.covers():
                routes[task][name] = 1.0
        return dict(routes)


def editor_order(weights: dict[str, float], rng: np.random.Generator) -> list[str]:
    """The task's editors in the order a pair tries them: a weighted draw without replacement."""
    names = sorted(weights)
    p = np.array([weights[n] for n in names], dtype=float)
    return [names[i] for i in rng.choice(len(names), size=len(names), replace=False, p=p / p.sum())]


def editor_name(row: dict) -> str:
    return row["editor"].split(":", 1)[0]


def subject_from(row: dict) -> Subject | None:
    """Rebuild the subject the instruct stage found (its mask travels as PNG, its description as JSON)."""
    if row["subject"] is None or row["mask"] is None:
        return None
    info = json.loads(row["subject"])
    return Subject(mask=decode_mask(row["mask"]), area_frac=info["area_frac"], bbox=tuple(info["bbox"]),
                   color=info["color"], where=info["where"], saturation=info["saturation"])


class EditStage(Stage):
    name = "edit"
    requires = ("src", "op", "params", "seed", "editor")
    adds = ("edited", "provenance")

    def __init__(self, cfg: EditConfig, ctx):
        super().__init__(cfg, ctx)
        self.editors = cfg.build()

    def process(self, rows: list[dict]) -> list[dict]:
        by_editor: dict[str, list[dict]] = defaultdict(list)
        for row in rows:
            by_editor[editor_name(row)].append(row)
        return [out for name, group in sorted(by_editor.items()) for out in self._edit(name, group)]

    def _edit(self, name: str, rows: list[dict]) -> list[dict]:
        editor = self.editors[name]
        try:
            images = [decode_own(row["src"]) for row in rows]
            requests = [EditRequest(op=row["op"], params=json.loads(row["params"]),
                                    instruction_en=row["instruction_en"], instruction_zh=row["instruction_zh"],
                                    seed=row["seed"], subject=subject_from(row)) for row in rows]
            results = editor.edit(images, requests)
        except Exception as e:  # one bad pair must not fail its batch: retry them one by one
            if len(rows) > 1:
                return [out for row in rows for out in self._edit(name, [row])]
            return [end_row(rows[0], REJECTED, self.name, e.reason, e.message) if isinstance(e, Rejected)
                    else self.fail(rows[0], e)]
        return [self._pair(row, image, result, editor) for row, image, result in zip(rows, images, results)]

    def _pair(self, row: dict, image: np.ndarray, result: EditOutput | Rejected | ItemFailed, editor: Editor) -> dict:
        if isinstance(result, (Rejected, ItemFailed)):
            status = REJECTED if isinstance(result, Rejected) else FAILED
            return end_row(row, status, self.name, result.reason, result.message)
        q = self.cfg.jpeg_quality
        provenance = {**json.loads(row["provenance"] or "{}"),
                      "edit": {**editor.provenance(), "editor": editor_name(row), "seed": row["seed"]},
                      "recipe_hash": self.ctx.recipe_hash}
        return {**row,
                "src": row["src"] if _same(result.source, image) else encode_jpeg(result.source, q),
                "edited": encode_jpeg(np.ascontiguousarray(result.edited), q),
                "mask": None if result.mask is None else encode_mask(result.mask),
                "provenance": json.dumps(provenance)}


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Did the op keep its input as the pair's source? (Reversed pairs build a new one.)"""
    return a is b or (a.shape == b.shape and np.array_equal(a, b))
