"""Global classical edits (style, tone, camera, edge map): they change the whole frame and need no subject.

Every op is deterministic and keeps the input's size; parameters are drawn by `sample_params` and written
verbatim into instructions, so each op does exactly what its name and parameters say.
"""
from __future__ import annotations

from typing import Callable

import cv2
import numpy as np

from workers.base import EditOp, EditOutput, Subject

PERSPECTIVE_DEGREES = 12.0  # how far the camera turns for camera.perspective
CARTOON_COLORS = 8
EDGE_PERCENTILE = 90  # Canny's high threshold: the gradient strength exceeded by 10 % of the pixels


def to_unit(image: np.ndarray) -> np.ndarray:
    """uint8 image → float32 in 0..1."""
    return image.astype(np.float32) / 255.0


def from_unit(image: np.ndarray) -> np.ndarray:
    """float image in 0..1 → uint8, clipped and rounded."""
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def _bgr(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image[..., ::-1])  # OpenCV's photo module expects BGR


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


def _crop_resize(image: np.ndarray, x0: float, y0: float, width: float, height: float) -> np.ndarray:
    """The window (x0, y0, width, height) scaled back to the full frame with one sub-pixel-exact warp."""
    h, w = image.shape[:2]
    scale = np.float32([[width / w, 0, x0], [0, height / h, y0]])
    return cv2.warpAffine(image, scale, (w, h), flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REFLECT)


# --- style_change -------------------------------------------------------------------------------------------

def _watercolor(image: np.ndarray, params: dict) -> np.ndarray:
    return cv2.stylization(_bgr(image), sigma_s=60, sigma_r=0.45)[..., ::-1]


def _pencil(image: np.ndarray, params: dict) -> np.ndarray:
    grey, _ = cv2.pencilSketch(_bgr(image), sigma_s=60, sigma_r=0.07, shade_factor=0.05)
    return _grey_to_rgb(grey)


def _color_pencil(image: np.ndarray, params: dict) -> np.ndarray:
    _, colour = cv2.pencilSketch(_bgr(image), sigma_s=60, sigma_r=0.07, shade_factor=0.05)
    return colour[..., ::-1]


def _oil(image: np.ndarray, params: dict) -> np.ndarray:
    return cv2.xphoto.oilPainting(_bgr(image), 7, 1)[..., ::-1]


def _cartoon(image: np.ndarray, params: dict) -> np.ndarray:
    """Flat colour regions (smoothing + k-means palette) outlined by dark edges."""
    smooth = image
    for _ in range(3):  # repeated small bilateral passes flatten textures but keep region borders
        smooth = cv2.bilateralFilter(smooth, 7, 40, 7)
    pixels = smooth.reshape(-1, 3).astype(np.float32)
    cv2.setRNGSeed(0)  # k-means++ seeding uses OpenCV's global RNG
    _, _, palette = cv2.kmeans(pixels[:: max(1, len(pixels) // 8000)], CARTOON_COLORS, None,
                               (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 20, 1.0), 1,
                               cv2.KMEANS_PP_CENTERS)
    sq = (pixels ** 2).sum(1)[:, None] - 2 * pixels @ palette.T + (palette ** 2).sum(1)[None, :]
    flat = palette[sq.argmin(1)].reshape(image.shape).astype(np.uint8)
    grey = cv2.medianBlur(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), 7)
    edges = cv2.adaptiveThreshold(grey, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY, 9, 4)
    return flat * (edges[..., None] > 0)


# --- tone_transformation ------------------------------------------------------------------------------------

_WARM_GAINS = np.float32([1.25, 1.02, 0.70])  # RGB gains of a full shift to a low colour temperature
_COOL_GAINS = np.float32([0.78, 0.97, 1.30])
_LUMA = np.float32([0.299, 0.587, 0.114])


def _white_balance(image: np.ndarray, gains: np.ndarray, strength: int) -> np.ndarray:
    """Move the white balance `strength` percent of the way to `gains`, keeping overall brightness."""
    partial = 1 + strength / 100 * (gains - 1)
    partial /= float(partial @ _LUMA)
    return from_unit(to_unit(image) * partial)


def _scale_saturation(rgb: np.ndarray, factor: float) -> np.ndarray:
    """Float RGB with its saturation scaled around each pixel's luma."""
    luma = (rgb @ _LUMA)[..., None]
    return luma + factor * (rgb - luma)


def _night(image: np.ndarray, params: dict) -> np.ndarray:
    rgb = _scale_saturation(to_unit(image), 0.45)
    rgb = 0.5 * rgb ** 1.5  # darker overall, and shadows sink more than highlights
    return from_unit(rgb * np.float32([0.72, 0.88, 1.3]) + np.float32([0.0, 0.01, 0.03]))  # moonlight blue


def _day(image: np.ndarray, params: dict) -> np.ndarray:
    rgb = to_unit(image)
    luma = rgb @ _LUMA
    exposure = np.clip(0.92 / max(float(np.percentile(luma, 97)), 1e-3), 1.0, 3.0)  # bright highlights
    lifted = np.clip(luma * exposure, 0, 1) ** 0.7  # open up the shadows
    contrast = lifted + 0.25 * lifted * (1 - lifted) * (2 * lifted - 1) * 2  # gentle S-curve
    rgb = rgb * (contrast / np.maximum(luma, 1e-3))[..., None]  # same hue, new brightness
    return from_unit(_scale_saturation(rgb, 1.15))


def _vintage(image: np.ndarray, params: dict) -> np.ndarray:
    rgb = to_unit(image)
    sepia = rgb @ np.float32([[0.393, 0.349, 0.272], [0.769, 0.686, 0.534], [0.189, 0.168, 0.131]])
    faded = 0.07 + 0.83 * (0.75 * sepia + 0.25 * rgb)  # lifted blacks, dulled whites
    h, w = image.shape[:2]
    ys, xs = np.ogrid[-1:1:h * 1j, -1:1:w * 1j]
    vignette = 1 - 0.45 * ((xs ** 2 + ys ** 2) / 2).astype(np.float32)
    return from_unit(faded * vignette[..., None])


# --- camera_movement ----------------------------------------------------------------------------------------

def _zoom_in(image: np.ndarray, params: dict) -> np.ndarray:
    h, w = image.shape[:2]
    keep = 1 / (1 + params["factor"] / 100)
    return _crop_resize(image, w * (1 - keep) / 2, h * (1 - keep) / 2, w * keep, h * keep)


PAN_WINDOW = 0.75  # both views show 75 % of the photo, so a pan of up to 33 % of the view stays inside it


def _pan(image: np.ndarray, params: dict, subject: Subject | None) -> EditOutput:
    """A pure pan: source and edited are two equally zoomed views of the photo, the edited one moved
    `amount` % of the view towards `direction` (so the instruction's percentage is exact)."""
    h, w = image.shape[:2]
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[params["direction"]]
    shift = params["amount"] / 100 * PAN_WINDOW
    x0, y0 = (1 - PAN_WINDOW) / 2 - dx * shift / 2, (1 - PAN_WINDOW) / 2 - dy * shift / 2

    def view(x: float, y: float) -> np.ndarray:
        return _crop_resize(image, x * w, y * h, w * PAN_WINDOW, h * PAN_WINDOW)

    return EditOutput(source=view(x0, y0), edited=view(x0 + dx * shift, y0 + dy * shift), mask=None)


def _rotate(image: np.ndarray, params: dict) -> np.ndarray:
    """Rotate about the centre, zoomed just enough that the rotated frame covers the whole output."""
    h, w = image.shape[:2]
    theta = np.radians(params["angle"])
    zoom = np.cos(theta) + max(h / w, w / h) * np.sin(theta)
    angle = params["angle"] if params["direction"] == "counterclockwise" else -params["angle"]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, zoom)
    return cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)


def _perspective(image: np.ndarray, params: dict) -> np.ndarray:
    """The view after the camera turns (yaws) towards `direction`, cropped to the largest full window."""
    h, w = image.shape[:2]
    focal = float(max(h, w))  # about a 53-degree field of view across the long side
    k = np.array([[focal, 0, w / 2], [0, focal, h / 2], [0, 0, 1]])
    # Rotating the viewing rays by +yaw moves the scene right in the frame, as when the camera turns left.
    yaw = np.radians(PERSPECTIVE_DEGREES) * (1 if params["direction"] == "left" else -1)
    rotation = np.array([[np.cos(yaw), 0, np.sin(yaw)], [0, 1, 0], [-np.sin(yaw), 0, np.cos(yaw)]])
    homography = k @ rotation @ np.linalg.inv(k)
    corners = np.float32([[0, 0], [w, 0], [w, h], [0, h]]).reshape(-1, 1, 2)
    (tl, tr, br, bl) = cv2.perspectiveTransform(corners, homography).reshape(4, 2)
    # The turned camera sees only the part of the warped photograph inside its frame; take the largest
    # axis-aligned box there without empty pixels, shrunk about its centre to the frame's aspect ratio.
    x0, x1 = max(tl[0], bl[0], 0), min(tr[0], br[0], w)
    y0, y1 = max(tl[1], tr[1], 0), min(bl[1], br[1], h)
    scale = min((x1 - x0) / w, (y1 - y0) / h)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    crop = np.array([[1 / scale, 0, w / 2 - cx / scale], [0, 1 / scale, h / 2 - cy / scale], [0, 0, 1]])
    return cv2.warpPerspective(image, crop @ homography, (w, h), flags=cv2.INTER_CUBIC,
                               borderMode=cv2.BORDER_REFLECT)


def _zoom_out(image: np.ndarray, params: dict, subject: Subject | None) -> EditOutput:
    """Reversed zoom in: the zoomed crop is the source and the real wider photograph the target."""
    return EditOutput(source=_zoom_in(image, params), edited=image, mask=None)


# --- low_level ----------------------------------------------------------------------------------------------

def edge_map(image: np.ndarray) -> np.ndarray:
    """Canny edges (white on black, RGB) with thresholds set from this image's own gradient strengths."""
    grey = cv2.GaussianBlur(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), (0, 0), 1.4)
    # Canny's L1 gradient magnitude; fixed thresholds would give empty maps on soft images and clutter on
    # busy ones, a high percentile keeps the edge density comparable across images.
    magnitude = np.abs(cv2.Sobel(grey, cv2.CV_32F, 1, 0)) + np.abs(cv2.Sobel(grey, cv2.CV_32F, 0, 1))
    high = max(float(np.percentile(magnitude, EDGE_PERCENTILE)), 8.0)
    return _grey_to_rgb(cv2.Canny(grey, 0.4 * high, high))


def _edges_to_photo(image: np.ndarray, params: dict, subject: Subject | None) -> EditOutput:
    """Reversed: the photograph is rendered from its edge map."""
    return EditOutput(source=edge_map(image), edited=image, mask=None)


# --- registry -----------------------------------------------------------------------------------------------

def sampler(**spec: tuple) -> Callable:
    """A params sampler: a (low, high) pair of ints draws an int in [low, high]; strings draw one of them."""
    def sample(rng: np.random.Generator, subject: Subject | None) -> dict:
        return {key: str(rng.choice(options)) if isinstance(options[0], str)
                else int(rng.integers(options[0], options[1] + 1)) for key, options in spec.items()}
    return sample


def _forward(fn: Callable[[np.ndarray, dict], np.ndarray]) -> Callable:
    """apply() for an edit whose source is the given image."""
    return lambda image, params, subject: EditOutput(source=image, edited=fn(image, params), mask=None)


def _op(name: str, task: str, apply: Callable, sample: Callable = sampler()) -> EditOp:
    return EditOp(name=name, task=task, needs_subject=False, sample_params=sample, apply=apply)


GLOBAL_OPS: tuple[EditOp, ...] = (
    _op("style.watercolor", "style_change", _forward(_watercolor)),
    _op("style.pencil", "style_change", _forward(_pencil)),
    _op("style.color_pencil", "style_change", _forward(_color_pencil)),
    _op("style.oil", "style_change", _forward(_oil)),
    _op("style.cartoon", "style_change", _forward(_cartoon)),
    _op("tone.warm", "tone_transformation",
        _forward(lambda image, params: _white_balance(image, _WARM_GAINS, params["strength"])),
        sampler(strength=(20, 60))),
    _op("tone.cool", "tone_transformation",
        _forward(lambda image, params: _white_balance(image, _COOL_GAINS, params["strength"])),
        sampler(strength=(20, 60))),
    _op("tone.night", "tone_transformation", _forward(_night)),
    _op("tone.day", "tone_transformation", _forward(_day)),
    _op("tone.vintage", "tone_transformation", _forward(_vintage)),
    _op("camera.zoom_in", "camera_movement", _forward(_zoom_in), sampler(factor=(20, 60))),
    _op("camera.zoom_out", "camera_movement", _zoom_out, sampler(factor=(20, 60))),
    _op("camera.pan", "camera_movement", _pan,
        sampler(direction=("left", "right", "up", "down"), amount=(10, 25))),
    _op("camera.rotate", "camera_movement", _forward(_rotate),
        sampler(direction=("clockwise", "counterclockwise"), angle=(5, 20))),
    _op("camera.perspective", "camera_movement", _forward(_perspective), sampler(direction=("left", "right"))),
    _op("low_level.edges_to_photo", "low_level", _edges_to_photo),
)
