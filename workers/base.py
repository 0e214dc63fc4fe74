"""The small interfaces that stages program against; every backend (classical, model, API) implements one.

Images are RGB uint8 arrays of shape (H, W, 3); masks are bool arrays of shape (H, W).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


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
