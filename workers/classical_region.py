"""Subject edits (background, colour, removal, addition): they need the subject mask from segmentation.

Edits are blended through a feathered mask so that no hard cut line betrays them; the pair's mask is the
region the edit is about.
"""
from __future__ import annotations

from typing import Callable

import cv2
import numpy as np

from workers.base import COLOR_WORDS, EditOp, EditOutput, Subject
from workers.classical_global import from_unit, sampler, to_unit

CHROMATIC_HUES = {"red": 0.0, "orange": 28.0, "yellow": 55.0, "green": 118.0, "cyan": 180.0,
                  "blue": 225.0, "purple": 270.0, "pink": 310.0}  # HSV hue (degrees) that each word names
BACKDROP_RGB = {"red": (190, 40, 40), "orange": (230, 130, 40), "yellow": (235, 210, 70),
                "green": (60, 150, 70), "cyan": (70, 190, 200), "blue": (50, 90, 190),
                "purple": (120, 60, 160), "pink": (235, 150, 185), "white": (240, 240, 236),
                "gray": (128, 128, 128), "black": (22, 22, 24), "brown": (120, 80, 45)}
MIN_RECOLOR_SATURATION = 0.25
FEATHER_FRAC = 0.006  # feather width as a fraction of the short side (about 3 px at 512)
REMOVAL_DILATE_FRAC = 0.02  # the removal mask grows by this fraction of the short side
MAX_CLONE_OVERLAP = 0.03  # a cloned patch may reach at most this much back into the hole
SMOOTH_FRAC = 0.015  # removal: blur (fraction of the short side) separating structure from texture
COLUMN_FILL_BIAS = 2.0  # removal: how much better a column-wise fill must fit to be chosen over rows
MAX_SEAM_COST = 0.12  # mean colour difference (0..1) around the hole above which a patch does not fit
assert set(BACKDROP_RGB) == set(COLOR_WORDS)


def feather(mask: np.ndarray) -> np.ndarray:
    """A soft float alpha (H, W, 1) from a bool mask, blurred in proportion to the image size."""
    sigma = max(1.0, FEATHER_FRAC * min(mask.shape))
    return cv2.GaussianBlur(mask.astype(np.float32), (0, 0), sigma)[..., None]


def blend(inside: np.ndarray, outside: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """uint8 composite of two images (uint8 or float 0..1) through a float alpha (1 = inside)."""
    inside_f = to_unit(inside) if inside.dtype == np.uint8 else inside
    outside_f = to_unit(outside) if outside.dtype == np.uint8 else outside
    return from_unit(inside_f * alpha + outside_f * (1 - alpha))


# --- background_change --------------------------------------------------------------------------------------

def _blur_background(image: np.ndarray, params: dict, subject: Subject) -> EditOutput:
    """Blur only background pixels, so the subject's colours do not bleed into the blurred background."""
    blurred = masked_blur(to_unit(image), 1 - subject.mask.astype(np.float32), params["sigma"])
    return EditOutput(source=image, edited=blend(image, blurred, feather(subject.mask)), mask=subject.mask)


def _replace_background(image: np.ndarray, params: dict, subject: Subject) -> EditOutput:
    """A studio-like plain backdrop: the named colour, slightly lighter at the top than at the bottom."""
    h, w = image.shape[:2]
    colour = np.float32(BACKDROP_RGB[params["backdrop"]]) / 255.0
    gradient = np.linspace(1.08, 0.88, h, dtype=np.float32)[:, None, None]
    backdrop = np.broadcast_to(colour * gradient, (h, w, 3))
    return EditOutput(source=image, edited=blend(image, backdrop, feather(subject.mask)), mask=subject.mask)


def _sample_backdrop(rng: np.random.Generator, subject: Subject) -> dict:
    return {"backdrop": str(rng.choice([word for word in COLOR_WORDS if word != subject.color]))}


# --- color_change -------------------------------------------------------------------------------------------

def _sample_recolor(rng: np.random.Generator, subject: Subject) -> dict | None:
    """A new chromatic colour, only for subjects whose own colour is clearly chromatic."""
    if subject.saturation < MIN_RECOLOR_SATURATION or subject.color not in CHROMATIC_HUES:
        return None
    return {"target": str(rng.choice([word for word in CHROMATIC_HUES if word != subject.color]))}


def _recolor(image: np.ndarray, params: dict, subject: Subject) -> EditOutput:
    """Rotate the subject's hues so its dominant hue becomes the target; saturation and value (texture) stay."""
    hsv = cv2.cvtColor(to_unit(image), cv2.COLOR_RGB2HSV)
    hue, sat = hsv[..., 0][subject.mask], hsv[..., 1][subject.mask]
    # Circular mean of the subject's hue, weighted by saturation (grey pixels have no meaningful hue).
    radians = np.radians(hue)
    dominant = np.degrees(np.arctan2((sat * np.sin(radians)).sum(), (sat * np.cos(radians)).sum()))
    hsv[..., 0] = (hsv[..., 0] + CHROMATIC_HUES[params["target"]] - dominant) % 360
    recoloured = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return EditOutput(source=image, edited=blend(recoloured, image, feather(subject.mask)), mask=subject.mask)


# --- subject_removal / subject_addition ---------------------------------------------------------------------

def removal_mask(mask: np.ndarray) -> np.ndarray:
    """The subject mask grown by ~2 % of the short side, so the fill also covers its soft outline."""
    radius = max(1, round(REMOVAL_DILATE_FRAC * min(mask.shape)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return cv2.dilate(mask.astype(np.uint8), kernel) > 0


def remove_subject(image: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """Fill `hole` from its surroundings: a smooth directional fill plus texture from a clean neighbour.

    Isotropic inpainting (Telea, Navier-Stokes) bends straight structures such as a horizon into a tent
    over a large hole. Interpolating along rows (or columns, whichever fits the hole's other two sides
    better) continues them, and the fine texture the interpolation lacks is borrowed from the best-matching
    region beside the hole, like a healing brush.
    """
    sigma = max(1.0, SMOOTH_FRAC * min(hole.shape))
    valid = 1 - hole.astype(np.float32)
    smooth = masked_blur(to_unit(image), valid, sigma)  # background-only colours near the hole's edge
    base = _directional_fill(smooth, hole)
    unreached = np.isnan(base[..., 0])  # a row and a column both entirely inside the hole
    if unreached.any():
        base[unreached] = to_unit(_coarse_inpaint(image, hole))[unreached]
    offset = _clean_offset(image, hole)
    if offset is not None:
        patch = to_unit(_shift(image, *offset))
        base += patch - cv2.GaussianBlur(patch, (0, 0), sigma)
    filled = image.copy()
    filled[hole] = from_unit(base)[hole]
    return filled


def masked_blur(image: np.ndarray, weight: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a float image that averages only pixels of positive weight (normalised convolution)."""
    spread = cv2.GaussianBlur(image * weight[..., None], (0, 0), sigma)
    coverage = cv2.GaussianBlur(weight, (0, 0), sigma)[..., None]
    return spread / np.maximum(coverage, 1e-4)


def _directional_fill(smooth: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """Row-wise or column-wise linear interpolation across the hole, whichever disagrees less with the
    hole's remaining two sides; NaN where the chosen direction finds no edge. Rows win unless columns fit
    clearly better: horizons, floors, tables and shelves make horizontal structure the common case."""
    best_cost, best = np.inf, smooth
    for transpose, bias in ((False, 1.0), (True, COLUMN_FILL_BIAS)):
        values, mask = (smooth.transpose(1, 0, 2), hole.T) if transpose else (smooth, hole)
        filled = _row_fill(values, mask)
        # Compare the fill just inside the hole's top and bottom edges with the pixels just outside.
        top, bottom = mask[1:] & ~mask[:-1], mask[:-1] & ~mask[1:]
        misfit = np.concatenate([filled[1:][top] - values[:-1][top], filled[:-1][bottom] - values[1:][bottom]])
        cost = bias * float(np.nanmean(np.abs(misfit))) if len(misfit) else 0.0
        if cost < best_cost:
            best_cost, best = cost, filled.transpose(1, 0, 2) if transpose else filled
    return best.copy()


def _row_fill(values: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """Each hole pixel linearly interpolated between the nearest non-hole pixels left and right of it."""
    h, w = hole.shape
    columns = np.broadcast_to(np.arange(w), (h, w))
    left = np.maximum.accumulate(np.where(hole, -1, columns), axis=1)
    right = np.minimum.accumulate(np.where(hole, w, columns)[:, ::-1], axis=1)[:, ::-1]
    # Inverse-distance weights of the two edges are exactly linear interpolation between them.
    weight_left = np.where(left >= 0, 1 / np.maximum(columns - left, 1), 0).astype(np.float32)
    weight_right = np.where(right < w, 1 / np.maximum(right - columns, 1), 0).astype(np.float32)
    rows = np.arange(h)[:, None]
    mixed = (values[rows, np.clip(left, 0, w - 1)] * weight_left[..., None]
             + values[rows, np.clip(right, 0, w - 1)] * weight_right[..., None])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(hole[..., None], mixed / (weight_left + weight_right)[..., None], values)


def _clean_offset(image: np.ndarray, hole: np.ndarray) -> tuple[int, int] | None:
    """The shift to the neighbouring region (left, right, above or below) that best continues the hole's
    surroundings, judged on a ring around the hole; None if no neighbour is clean and similar enough."""
    ys, xs = np.nonzero(hole)
    margin = max(2, round(REMOVAL_DILATE_FRAC * min(hole.shape)))
    width, height = int(xs.max() - xs.min()) + 1 + margin, int(ys.max() - ys.min()) + 1 + margin
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1, 2 * margin + 1))
    ring = (cv2.dilate(hole.astype(np.uint8), kernel) > 0) & ~hole
    best, best_cost = None, MAX_SEAM_COST
    for offset in ((-width, 0), (width, 0), (0, -height), (0, height)):
        if _shift(hole.astype(np.uint8), *offset)[hole].mean() > MAX_CLONE_OVERLAP:
            continue  # the patch would copy part of the subject
        cost = float(np.abs(image[ring].astype(np.float32) - _shift(image, *offset)[ring]).mean()) / 255
        if cost < best_cost:
            best, best_cost = offset, cost
    return best


def _shift(image: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """The image content at (x + dx, y + dy) for every pixel; the frame edges reflect."""
    matrix = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(image, matrix, image.shape[1::-1], flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REFLECT)


def _coarse_inpaint(image: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """Telea inpainting of a ~128 px version of the image, upscaled: a smooth fallback for any hole."""
    h, w = image.shape[:2]
    factor = max(1, min(h, w) // 128)
    size = (w // factor, h // factor)
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    # Any coarse pixel that touches the hole is part of the coarse hole.
    small_hole = (cv2.resize(hole.astype(np.float32), size, interpolation=cv2.INTER_AREA) > 0).astype(np.uint8)
    coarse = cv2.inpaint(small, small_hole, 3, cv2.INPAINT_TELEA)  # channel order does not matter here
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)


def _remove(image: np.ndarray, params: dict, subject: Subject) -> EditOutput:
    hole = removal_mask(subject.mask)
    return EditOutput(source=image, edited=remove_subject(image, hole), mask=hole)


def _add(image: np.ndarray, params: dict, subject: Subject) -> EditOutput:
    """Reversed removal: the inpainted image is the source and the real photograph the target."""
    hole = removal_mask(subject.mask)
    return EditOutput(source=remove_subject(image, hole), edited=image, mask=hole)


# --- registry -----------------------------------------------------------------------------------------------

def _with_subject(sample: Callable) -> Callable:
    """A params sampler that declines (None) when there is no subject to edit."""
    return lambda rng, subject: None if subject is None else sample(rng, subject)


def _op(name: str, task: str, sample: Callable, apply: Callable) -> EditOp:
    return EditOp(name=name, task=task, needs_subject=True, sample_params=_with_subject(sample), apply=apply)


REGION_OPS: tuple[EditOp, ...] = (
    _op("background.blur", "background_change", sampler(sigma=(6, 16)), _blur_background),
    _op("background.replace", "background_change", _sample_backdrop, _replace_background),
    _op("color.recolor", "color_change", _sample_recolor, _recolor),
    _op("removal.inpaint", "subject_removal", sampler(), _remove),
    _op("addition.reverse_inpaint", "subject_addition", sampler(), _add),
)
