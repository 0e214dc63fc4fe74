"""The small interfaces that stages program against; every backend (classical, model, API) implements one.

- `Editor` (the edit stage's backends, registry in stages/edit.py): makes the edited image of a pair.
- `Instructor` (the instruct stage's backends, registry in stages/instruct.py): finds what an image offers
  and writes the pair's instruction, in English and Chinese, for a task and the editor routed to it.
- `Rejected` (manifests/rejected.py): what a worker raises, or returns for one item of a batch, to end a row
  as rejected with a reason code (a gate that fails, an unusable model output) rather than as failed;
  `ItemFailed`, returned for one item, ends it as failed with a reason code (out of memory).

Images are RGB uint8 arrays of shape (H, W, 3); masks are bool arrays of shape (H, W).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Protocol

import numpy as np

from manifests.rejected import ItemFailed, Rejected


@dataclass(frozen=True)
class Subject:
    """The salient subject of an image, as found by a segmentation backend."""

    mask: np.ndarray  # bool (H, W)
    area_frac: float  # mask pixels / image pixels
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    color: str  # dominant colour, a word of COLOR_WORDS
    where: str  # position in the frame, a word of POSITION_WORDS
    saturation: float  # mean HSV saturation of the subject, 0..1 (is a colour change meaningful?)


@dataclass(frozen=True)
class EditOutput:
    """One edit. `source` is the pair's input image: usually the image given to the op, but a reversed
    pair (subject addition from a removal, zoom out from a zoom in, photo from its edge map) builds a new
    source and keeps the real photograph as the edited target."""

    source: np.ndarray
    edited: np.ndarray
    mask: np.ndarray | None  # the region the edit is about; None for global edits


@dataclass(frozen=True)
class EditOp:
    """One concrete operation an editor can perform, honestly named.

    `sample_params` draws the op's parameters from a seeded generator; the instruction is written from the
    same parameters, so the text says exactly what `apply` does.
    """

    name: str  # "<family>.<variant>", e.g. "tone.warm"
    task: str  # canonical task name (manifests.taxonomy)
    needs_subject: bool
    sample_params: Callable[[np.random.Generator, Subject | None], dict]
    apply: Callable[[np.ndarray, dict, Subject | None], EditOutput]


COLOR_WORDS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink",
               "white", "gray", "black", "brown")
POSITION_WORDS = ("center", "left", "right", "top", "bottom",
                  "top left", "top right", "bottom left", "bottom right")


@dataclass(frozen=True)
class EditRequest:
    """What an editor is asked to do. Classical editors run `op` with `params`; model editors read the
    instruction (and may use op/params as hints); `seed` makes stochastic editors reproducible."""

    op: str
    params: dict
    instruction_en: str
    instruction_zh: str
    seed: int
    subject: Subject | None


@dataclass(frozen=True)
class Proposal:
    """One candidate pair as the instructor writes it: the task, what the editor is asked to run (`op` and
    `params`: a classical op, or the instruction template and its slots), and the instruction. `subject` is
    the region the pair is about when the editor found its own (a detected and segmented object); it travels
    to the edit stage in place of the instructor's subject."""

    task: str
    op: str
    params: dict
    instruction_en: str
    instruction_zh: str
    subject: Subject | None = None


class Editor(Protocol):
    """An edit backend, built from its recipe config (`Config`, a typed block with `backend: <name>`) once
    per actor. Construction is cheap: the instruct stage and the report build editors only to ask what they
    cover; a model loads on the first `edit` call."""

    backend: ClassVar[str]  # its name in the registry
    follows_instructions: ClassVar[bool]  # True: edits from the instruction text; False: runs op + params

    def covers(self) -> frozenset[str]:
        """The tasks (canonical names) this editor, as configured, can perform."""

    def propose(self, task: str, image: np.ndarray, subject: Subject | None,
                rng: np.random.Generator) -> Proposal | None:
        """Editors that do not follow instructions only: an edit of `task` this editor can really make on this
        image (op and params), with an instruction that says exactly what it does; None when it cannot."""

    def edit(self, images: list[np.ndarray], requests: list[EditRequest]) -> list[EditOutput | Rejected | ItemFailed]:
        """One output per request, in order; a `Rejected` item ends that pair alone as rejected, an `ItemFailed`
        one as failed (e.g. out of memory at batch 1). An exception fails the batch (the stage then retries its
        pairs one by one)."""

    def provenance(self) -> dict:
        """What made the edits, for each pair's record: worker, version, model id/revision, dtype, settings."""


class Instructor(Protocol):
    """An instruction backend, built once per actor as `cls(min_area, max_area, cfg, tasks)`: the recipe's
    subject-area gate, the backend's own config block (`instruct.<backend>`, None if it has none) and the tasks
    routed to editors that follow instructions (what a proposal needs to cover). `propose` may raise
    `Rejected` to end that one candidate pair with a reason (an instruction that failed its checks)."""

    name: ClassVar[str]
    version: ClassVar[str]

    def analyze(self, image: np.ndarray) -> Subject | None:
        """The subject region edits may name (None when the image has none that passes the gates)."""

    def propose(self, task: str, editor: Editor, image: np.ndarray, subject: Subject | None,
                rng: np.random.Generator) -> Proposal | None:
        """A pair of `task` for this editor on this image, or None when it cannot honestly make one."""
