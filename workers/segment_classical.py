"""Classical salient-object segmentation: a boundary-prior colour-contrast map refined by GrabCut.

The frame's borders are mostly background in photographs, so a pixel whose Lab colour is far from the
border colours is salient. Requiring it to differ from at least three of the four sides (not all four)
keeps subjects that touch one edge (a portrait cut by the bottom of the frame). The map seeds GrabCut,
whose colour models turn the blurry map into an object-shaped mask. Everything runs at a small working
resolution and the mask is scaled back, which keeps one image well under 0.1 s.
"""
from __future__ import annotations

import cv2
import numpy as np

from workers.base import COLOR_WORDS, POSITION_WORDS, Subject

WORK_SIDE = 224  # long side of the working image
BORDER_FRAC = 0.04  # width of the border band that samples background colours
SAMPLES_PER_SIDE = 48
MIN_CONTRAST = 12.0  # Lab distance below which nothing stands out (flat or uniform images)
MIN_AREA, MAX_AREA = 0.004, 0.85  # subject area fractions we accept
GRABCUT_ITERS = 3

# Hue boundaries in degrees (upper bound exclusive) for the chromatic words; red wraps around 0.
_HUE_BINS = ((12, "red"), (40, "orange"), (70, "yellow"), (165, "green"), (195, "cyan"),
             (255, "blue"), (285, "purple"), (335, "pink"), (360, "red"))


def find_subject(image: np.ndarray) -> Subject | None:
    """The most salient object of an RGB uint8 image, or None when nothing stands out."""
    h, w = image.shape[:2]
    scale = WORK_SIDE / max(h, w)
    small = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    saliency = _boundary_contrast(small)
    if saliency is None:
        return None
    small_mask = _largest_component(_grabcut(small, saliency))
    if small_mask is None:
        return None
    mask = cv2.resize(small_mask.astype(np.uint8) * 255, (w, h), interpolation=cv2.INTER_LINEAR) > 127
    area_frac = float(mask.mean())
    if not MIN_AREA <= area_frac <= MAX_AREA:
        return None
    return describe_subject(image, mask)


def describe_subject(image: np.ndarray, mask: np.ndarray) -> Subject:
    """Subject fields (area, box, colour word, position word, saturation) of a bool mask on an RGB image."""
    ys, xs = np.nonzero(mask)
    # A strided sample of at most ~20k pixels describes the colour as well as all of them, and faster.
    pixels = image[ys, xs][:: max(1, len(ys) // 20_000)]
    return Subject(
        mask=mask,
        area_frac=float(mask.mean()),
        bbox=(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
        color=color_word(pixels),
        where=position_word(float(xs.mean()) / mask.shape[1], float(ys.mean()) / mask.shape[0]),
        saturation=float(_hsv(pixels)[:, 1].mean()),
    )


def color_word(pixels: np.ndarray) -> str:
    """The most frequent colour word among RGB pixels of shape (N, 3)."""
    hue, sat, val = _hsv(pixels).T
    index = {word: i for i, word in enumerate(COLOR_WORDS)}
    words = np.full(len(hue), index["gray"])
    words[(sat < 0.2) & (val > 0.8)] = index["white"]
    chromatic = sat >= 0.2
    lower = 0.0
    for upper, word in _HUE_BINS:
        words[chromatic & (hue >= lower) & (hue < upper)] = index[word]
        lower = upper
    # Dark warm hues read as brown, pale reds as pink; very dark pixels are black whatever their hue.
    reddish = (hue < 12) | (hue >= 335)
    words[chromatic & (reddish | (hue < 50)) & (val < 0.55)] = index["brown"]
    words[chromatic & reddish & (sat < 0.5) & (val > 0.7)] = index["pink"]
    words[val < 0.2] = index["black"]
    return COLOR_WORDS[int(np.bincount(words, minlength=len(COLOR_WORDS)).argmax())]  # ties: first word


def position_word(cx: float, cy: float) -> str:
    """The 3x3-grid position word of a centroid given as fractions of the frame width and height."""
    column = ("left", "", "right")[min(int(cx * 3), 2)]
    row = ("top", "", "bottom")[min(int(cy * 3), 2)]
    word = " ".join(part for part in (row, column) if part) or "center"
    assert word in POSITION_WORDS
    return word


def _hsv(pixels: np.ndarray) -> np.ndarray:
    """Float HSV (hue in degrees, saturation and value in 0..1) of RGB uint8 pixels of shape (N, 3)."""
    rgb = pixels.reshape(-1, 1, 3).astype(np.float32) / 255.0
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV).reshape(-1, 3)


def _boundary_contrast(small: np.ndarray) -> np.ndarray | None:
    """Per-pixel Lab distance to the border colours (second-smallest over the four sides), or None if flat."""
    lab = cv2.cvtColor(cv2.GaussianBlur(small, (0, 0), 1.5).astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)
    lab[..., 0] *= 0.5  # shadows and shading change lightness more than colour; weigh them down
    h, w = lab.shape[:2]
    band = max(2, round(BORDER_FRAC * min(h, w)))
    sides = (lab[:band], lab[-band:], lab[:, :band], lab[:, -band:])
    pixels = lab.reshape(-1, 3)
    distances = []
    for side in sides:
        flat = side.reshape(-1, 3)
        prototypes = flat[np.linspace(0, len(flat) - 1, SAMPLES_PER_SIDE).astype(int)]
        # |p - q|^2 = |p|^2 - 2 p.q + |q|^2, computed as one matrix product instead of an (N, S, 3) array.
        sq = (pixels ** 2).sum(1)[:, None] - 2 * pixels @ prototypes.T + (prototypes ** 2).sum(1)[None, :]
        distances.append(np.sqrt(np.maximum(sq.min(1), 0)))
    contrast = np.sort(np.stack(distances, 1), axis=1)[:, 1].reshape(h, w)
    peak = float(np.percentile(contrast, 99.5))
    if peak < MIN_CONTRAST:
        return None
    return np.clip(contrast / peak, 0, 1)


def _grabcut(small: np.ndarray, saliency: np.ndarray) -> np.ndarray:
    """GrabCut seeded from the saliency map: Otsu split into probable labels, confident tails fixed."""
    sal8 = (saliency * 255).astype(np.uint8)
    threshold, _ = cv2.threshold(sal8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    labels = np.full(sal8.shape, cv2.GC_PR_BGD, np.uint8)
    labels[sal8 >= threshold] = cv2.GC_PR_FGD
    labels[sal8 < 0.4 * threshold] = cv2.GC_BGD
    core = cv2.erode((sal8 >= max(threshold, 0.6 * 255)).astype(np.uint8), np.ones((5, 5), np.uint8))
    labels[core > 0] = cv2.GC_FGD
    if not (labels == cv2.GC_FGD).any() and not (labels == cv2.GC_PR_FGD).any():
        return np.zeros(sal8.shape, bool)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(0)  # GrabCut seeds its colour models with k-means on OpenCV's global RNG
    cv2.grabCut(np.ascontiguousarray(small[..., ::-1]), labels, None, bgd, fgd, GRABCUT_ITERS,
                cv2.GC_INIT_WITH_MASK)
    return (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)


def _largest_component(mask: np.ndarray) -> np.ndarray | None:
    """The largest connected component of a bool mask, smoothed and with holes filled; None if empty."""
    smooth = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(smooth, connectivity=8)
    if count < 2:
        return None
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    component = (labels == largest).astype(np.uint8)
    # Fill holes: everything not reachable from outside the component belongs to it.
    padded = np.pad(component, 1)
    cv2.floodFill(padded, None, (0, 0), 2)
    return (padded[1:-1, 1:-1] != 2)
