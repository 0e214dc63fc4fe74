"""Heuristic scores that need no model: image quality (sharpness, exposure, clipping, noise) and edit
consistency (how much changed inside vs outside the edit mask, in pixel values and in detail). All on a
0..1 or natural scale, stored as floats; the policy decides what is acceptable."""
from __future__ import annotations

import cv2
import numpy as np

_ANALYSIS_SIDE = 512  # scores are computed at a fixed scale so thresholds mean the same for any input
# Added to both mean gradients (grey levels per pixel) so that a flat region, whose ratio would be noise
# over noise, scores near 0. A plain backdrop after JPEG measures ~0.06, the bundled backgrounds 1.5-10.
_DETAIL_FLOOR = 0.25


_LANES = 64  # `_mean` keeps this many running sums, one per column of the values laid out in rows


def _mean(values: np.ndarray) -> float:
    """The mean summed in one fixed order in float64. numpy's sum along an array's contiguous axis groups the
    additions by the memory alignment, so the same values could give a last-bit different mean in another
    process, and a pair's json (its scores) would differ between a resumed run and an uninterrupted one. Here
    the values are laid out in rows of _LANES and the rows added one after another, element by element (a
    reduction along axis 0: each lane's additions in row order), then the lanes in order: the same bits
    whatever the alignment, and no float64 copy of the values (a running sum made one: twice the heuristics'
    time). `_mean_reference` is its naive reference."""
    flat = np.ravel(values)
    whole = flat.size - flat.size % _LANES
    lanes = np.zeros(_LANES)
    if whole:
        lanes = np.add.reduce(flat[:whole].reshape(-1, _LANES), axis=0, dtype=np.float64)
    lanes[:flat.size - whole] += flat[whole:]  # the last, partial row
    return float(sum(lanes.tolist()) / flat.size) if flat.size else 0.0


def _mean_reference(values: np.ndarray) -> float:
    """`_mean` one value at a time (tests check they agree bit for bit)."""
    lanes = [0.0] * _LANES
    for i, value in enumerate(np.ravel(values).tolist()):
        lanes[i % _LANES] += value
    return sum(lanes) / values.size if values.size else 0.0


def _gray(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    scale = _ANALYSIS_SIDE / min(h, w)
    if scale < 1:
        image = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)


def sharpness(gray: np.ndarray) -> float:
    """Variance of the Laplacian: the classic focus measure (Pech-Pacheco et al. 2000)."""
    laplacian = cv2.Laplacian(gray, cv2.CV_32F)
    return _mean(np.square(laplacian - _mean(laplacian), dtype=np.float64))


def noise_sigma(gray: np.ndarray) -> float:
    """Fast noise estimate (Immerkær 1996): a Laplacian-difference kernel cancels image structure."""
    kernel = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)
    response = np.abs(cv2.filter2D(gray, cv2.CV_32F, kernel))[1:-1, 1:-1]
    return float(np.sqrt(np.pi / 2) * _mean(response) / 6)


def _mean_gradient(gray: np.ndarray, where: np.ndarray) -> float:
    """Mean gradient magnitude over `where`, in grey levels per pixel (Sobel / 8: a ramp reads its slope)."""
    dx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, scale=0.125)
    dy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, scale=0.125)
    # Not cv2.magnitude: ~30 % of its values are not the correctly rounded ones, and the score computed from it
    # came out different in the last bits in two Ray workers on the same pixels (a resumed run's json then
    # differed). The Sobel values are exact multiples of 1/8: their squares and sums are exact in float64, and
    # sqrt is correctly rounded, so every process gets the same values.
    return _mean(np.sqrt(np.square(dx, dtype=np.float64) + np.square(dy, dtype=np.float64))[where])


def detail_change(src_gray: np.ndarray, edited_gray: np.ndarray, where: np.ndarray) -> float:
    """0..1: the share of a region's detail lost or gained, 1 - smaller/larger mean gradient.

    A blur moves mean pixel values very little (mean absolute change ~0.01) yet removes most of the
    gradient energy, which is what the eye sees. Both directions count, so added texture scores too."""
    before = _mean_gradient(src_gray, where) + _DETAIL_FLOOR
    after = _mean_gradient(edited_gray, where) + _DETAIL_FLOOR
    return 1 - min(before, after) / max(before, after)


IMAGE_SCORES = ("sharpness", "exposure", "clipped", "noise")  # image_scores' names, each `<name>_<suffix>`
EDIT_SCORES = ("change_global", "mask_area", "change_inside", "change_outside", "detail_change_outside")


def image_scores(image: np.ndarray, suffix: str) -> dict[str, float]:
    gray = _gray(image)
    values = (sharpness(gray), _mean(gray) / 255, float(((gray <= 2) | (gray >= 253)).mean()), noise_sigma(gray))
    return {f"{name}_{suffix}": value for name, value in zip(IMAGE_SCORES, values)}


def quality_score(image: np.ndarray) -> float:
    """A 0..10 stand-in for an aesthetic pre-filter when the source has no score: sharp, well exposed,
    not clipped. Crude by design; GPU recipes use a learned scorer."""
    s = image_scores(image, "x")
    sharp = min(np.log10(1 + s["sharpness_x"]) / 3, 1.0)
    exposure = 1 - 2 * abs(s["exposure_x"] - 0.5)
    return float(10 * (0.6 * sharp + 0.4 * exposure) * (1 - s["clipped_x"]))


def edit_scores(src: np.ndarray, edited: np.ndarray, mask: np.ndarray | None) -> dict[str, float]:
    """Mean absolute change (0..1) over the image, and inside/outside the edit mask when there is one;
    with a mask also the detail change outside it (`detail_change`), which is how a background blur shows.
    EDIT_SCORES names them all (the first without a mask)."""
    if edited.shape != src.shape:
        edited = cv2.resize(edited, (src.shape[1], src.shape[0]), interpolation=cv2.INTER_AREA)
    diff = np.abs(src.astype(np.int16) - edited.astype(np.int16)).mean(axis=2) / 255
    scores = {"change_global": _mean(diff)}
    if mask is not None:
        inside = mask.astype(bool)
        scores["mask_area"] = float(inside.mean())
        scores["change_inside"] = _mean(diff[inside])
        scores["change_outside"] = _mean(diff[~inside])
        src_gray, edited_gray = _gray(src), _gray(edited)  # the fixed analysis scale; the mask follows
        outside = cv2.resize((~inside).astype(np.uint8), src_gray.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
        scores["detail_change_outside"] = detail_change(src_gray, edited_gray, outside) if outside.any() else 0.0
    return scores
