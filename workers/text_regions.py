"""The text of an OCR reading and its region: comparing texts, choosing the new word, and the quadrilateral's
mask, size, straightening and strokes (shared by the text editor's classical and fill renderers)."""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

MAX_LENGTH_CHANGE = 3  # characters; the reference rejects Chinese rewrites that change length by more
Language = Literal["en", "zh"]


@dataclass(frozen=True)
class Reading:
    """One line of text the OCR found: its quadrilateral (top-left, top-right, bottom-right, bottom-left)."""

    quad: np.ndarray  # float32 (4, 2), x and y in pixels
    text: str
    score: float


def normalize(text: str) -> str:
    """The form texts are compared in: NFKC (full-width → ASCII), case-folded, letters and digits only (the
    recogniser drops spaces and often misreads punctuation)."""
    return "".join(ch for ch in unicodedata.normalize("NFKC", text).casefold() if ch.isalnum())


def language_of(text: str) -> Language | None:
    """zh for text with Chinese characters (CJK Unified Ideographs), en for Latin letters, else None."""
    if any("\u4e00" <= ch <= "\u9fff" for ch in text):
        return "zh"
    return "en" if any("a" <= ch <= "z" for ch in normalize(text)) else None


def choose_word(old: str, words: list[str], rng: np.random.Generator) -> str | None:
    """A word of the list other than `old`, of similar length, in the old text's letter case; None if none."""
    key = normalize(old)
    pool = [w for w in words if normalize(w) != key and abs(len(normalize(w)) - len(key)) <= MAX_LENGTH_CHANGE]
    if not pool:
        return None
    word = str(pool[rng.integers(len(pool))])
    letters = [ch for ch in old if ch.isalpha()]
    if letters and all(ch.isupper() for ch in letters):
        return word.upper()
    return word[:1].upper() + word[1:] if old[:1].isupper() else word


def quad_area(quad: np.ndarray) -> float:
    return float(cv2.contourArea(quad.astype(np.float32)))


def quad_mask(quad: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    mask = np.zeros(shape[:2], np.uint8)
    cv2.fillPoly(mask, [np.round(quad).astype(np.int32)], 1)
    return mask.astype(bool)


def quad_size(quad: np.ndarray) -> tuple[int, int]:
    """(width, height) of the straightened region: its longer opposite sides."""
    top, bottom = np.linalg.norm(quad[1] - quad[0]), np.linalg.norm(quad[2] - quad[3])
    left, right = np.linalg.norm(quad[3] - quad[0]), np.linalg.norm(quad[2] - quad[1])
    return max(2, round(max(top, bottom))), max(2, round(max(left, right)))


def straighten(quad: np.ndarray) -> tuple[np.ndarray, int, int]:
    """The perspective transform from the region to its straightened rectangle, and that rectangle's size."""
    width, height = quad_size(quad)
    rect = np.float32([[0, 0], [width, 0], [width, height], [0, height]])
    return cv2.getPerspectiveTransform(quad, rect), width, height


def strokes(crop: np.ndarray) -> np.ndarray:
    """bool mask of the text pixels of a straightened text region."""
    pixels = crop.reshape(-1, 3).astype(np.float32)
    centred = pixels - pixels.mean(0)
    _, axes = np.linalg.eigh(centred.T @ centred)
    # Projected on the main colour axis, text and background separate even when their brightness is alike.
    projected = cv2.normalize(centred @ axes[:, -1], None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    _, split = cv2.threshold(projected, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    split = split.reshape(crop.shape[:2]).astype(bool)
    border = np.ones_like(split)
    border[1:-1, 1:-1] = False
    return ~split if split[border].mean() > 0.5 else split


def inside(quad: np.ndarray, region: np.ndarray) -> bool:
    x, y = np.clip(quad.mean(0).round().astype(int), 0, np.array(region.shape[::-1]) - 1)
    return bool(region[y, x])
