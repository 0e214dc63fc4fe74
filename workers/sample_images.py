"""Sample source images that need no download: scikit-image's bundled photos and procedural scenes.

Scikit-image ships some of its sample images inside the wheel and downloads the rest on demand; only the
bundled 8-bit colour and grey images are listed here (binary masks, the float phantom and the stack of tiny
face crops are not photographs). Several are smaller than 512 px; they are kept on purpose, the pipeline
rejects them for size and records that in its ledger.

Generated signs, labels and posters carry real text for the text-change workflow (workers/text_samples.py).

Generated scenes are license-clean stand-ins for photographs: a sky gradient over textured ground with faint
clutter, and one clearly salient, shaded coloured object with a soft shadow. Each scene also returns the
object's ground-truth mask, so segmentation can be measured.
"""
from __future__ import annotations

import functools
import re

import cv2
import numpy as np
import skimage.data

from workers.text_samples import generate_text_sample

SKIMAGE_IMAGES = ("astronaut", "brick", "camera", "cat", "cell", "checkerboard", "chelsea", "clock", "coffee",
                  "coins", "colorwheel", "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "logo",
                  "microaneurysms", "moon", "page", "retina", "rocket", "stereo_motorcycle", "text")
SCENE_SIZES = ((512, 512), (512, 640), (640, 512), (512, 768), (768, 512))  # (height, width)
SHAPES = ("disc", "ellipse", "rounded_rectangle", "polygon", "blob")
_SEED_SALT = 20_251_127  # keeps scene seeds apart from other users of small integer seeds


def list_samples(n_generated: int, n_text: int = 0) -> list[str]:
    """Sorted names of the bundled images that load offline, `n_generated` scenes and `n_text` signs with text
    (workers/text_samples.py, for the text-change workflow)."""
    names = [f"skimage-{fn.replace('_', '-')}" for fn in _available_skimage()]
    names += [f"scene-{index:04d}" for index in range(n_generated)]
    names += [f"text-{index:04d}" for index in range(n_text)]
    return sorted(names)


def load_sample(name: str) -> bytes:
    """PNG bytes of a sample named by `list_samples`."""
    if re.fullmatch(r"scene-\d{4,}", name):
        image, _ = generate_scene(int(name.removeprefix("scene-")))
    elif re.fullmatch(r"text-\d{4,}", name):
        image, _ = generate_text_sample(int(name.removeprefix("text-")))
    elif name.startswith("skimage-"):
        image = _skimage_rgb(name.removeprefix("skimage-").replace("-", "_"))
    else:
        raise KeyError(f"unknown sample {name!r}")
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]))
    assert ok
    return encoded.tobytes()


@functools.cache
def _available_skimage() -> tuple[str, ...]:
    """The SKIMAGE_IMAGES that load without a download on this installation."""
    available = []
    for fn in SKIMAGE_IMAGES:
        try:
            _skimage_rgb(fn)
        except Exception:  # scikit-image raises several types when a file needs pooch or the network
            continue
        available.append(fn)
    return tuple(available)


def _skimage_rgb(fn: str) -> np.ndarray:
    if fn not in SKIMAGE_IMAGES:
        raise KeyError(f"unknown scikit-image sample {fn!r}")
    image = getattr(skimage.data, fn)()
    if fn == "stereo_motorcycle":
        image = image[0]  # (left, right, disparity): the left view
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.shape[2] == 4:  # the logo has transparency: flatten onto white
        alpha = image[..., 3:].astype(np.float32) / 255.0
        image = (image[..., :3] * alpha + 255.0 * (1 - alpha)).round().astype(np.uint8)
    return np.ascontiguousarray(image)


def generate_scene(index: int) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic procedural scene: (RGB uint8 image, bool mask of its one main object)."""
    rng = np.random.default_rng([_SEED_SALT, index])
    h, w = SCENE_SIZES[rng.integers(len(SCENE_SIZES))]
    canvas = _background(rng, h, w)
    mask = _object_mask(rng, h, w)
    # Soft shadow: the silhouette offset away from a light coming from the upper left or upper right.
    size = np.sqrt(mask.sum())
    offset_x = rng.choice((-1, 1)) * rng.uniform(0.02, 0.05) * size
    shift = np.float32([[1, 0, offset_x], [0, 1, rng.uniform(0.02, 0.05) * size]])
    shadow = cv2.warpAffine(mask.astype(np.float32), shift, (w, h))
    shadow = cv2.GaussianBlur(shadow, (0, 0), 0.03 * size)[..., None]
    canvas *= 1 - rng.uniform(0.15, 0.3) * shadow
    # Paint the object inside its box (plus the anti-aliased edge) only: most of the frame is background.
    ys, xs = np.nonzero(mask)
    box = np.s_[max(ys.min() - 3, 0):ys.max() + 4, max(xs.min() - 3, 0):xs.max() + 4]
    soft = cv2.GaussianBlur(mask[box].astype(np.float32), (0, 0), 0.8)[..., None]  # anti-aliased edge
    canvas[box] = canvas[box] * (1 - soft) + _object_paint(rng, mask[box], -np.sign(offset_x)) * soft
    canvas += rng.standard_normal((h, w, 1), dtype=np.float32) * 0.006  # faint sensor grain
    return (np.clip(canvas, 0, 1) * 255).round().astype(np.uint8), mask


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Zero-mean smooth noise of roughly unit amplitude: random cells (`cells` along the long side) upscaled."""
    long_side = max(h, w)
    shape = (max(2, round(cells * h / long_side)), max(2, round(cells * w / long_side)))
    coarse = rng.standard_normal(shape, dtype=np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)


def _hsv_to_rgb(hue: float, sat: float, val: float) -> np.ndarray:
    pixel = np.float32([[[hue, sat, val]]])
    return cv2.cvtColor(pixel, cv2.COLOR_HSV2RGB)[0, 0]


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Float RGB (0..1) sky gradient over textured ground, with a wavy horizon and faint clutter."""
    rows = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    sky_hue = rng.uniform(195, 225)
    zenith = _hsv_to_rgb(sky_hue, rng.uniform(0.25, 0.55), rng.uniform(0.65, 0.9))
    haze = _hsv_to_rgb(sky_hue, rng.uniform(0.05, 0.2), rng.uniform(0.85, 0.97))
    sky = zenith + (haze - zenith) * rows + 0.03 * _smooth_noise(rng, h, w, 4)[..., None]  # thin clouds

    ground_hue = rng.choice((35.0, 55.0, 90.0, 110.0))  # earth, sand, dry grass, grass
    far = _hsv_to_rgb(ground_hue, rng.uniform(0.2, 0.4), rng.uniform(0.55, 0.7))
    near = _hsv_to_rgb(ground_hue, rng.uniform(0.25, 0.45), rng.uniform(0.3, 0.5))
    texture = 0.6 * _smooth_noise(rng, h, w, 6) + 0.4 * _smooth_noise(rng, h, w, 40)
    texture = 1 + 0.08 * texture + 0.05 * _smooth_noise(rng, h, w, 200)  # + blades, pebbles
    ground = (far + (near - far) * rows) * texture[..., None]

    # A horizon of gentle hills with a ragged fringe of grass or stones along it.
    hills = 0.04 * h * _smooth_noise(rng, 1, w, 5)[0]
    fringe = 0.012 * h * rng.standard_normal(w).astype(np.float32)
    horizon = rng.uniform(0.3, 0.6) * h + hills + fringe
    is_ground = (np.arange(h, dtype=np.float32)[:, None] > horizon)[..., None].astype(np.float32)
    is_ground = cv2.GaussianBlur(is_ground, (0, 0), 1.5)[..., None]
    canvas = sky * (1 - is_ground) + ground * is_ground

    clutter = np.zeros((h, w), np.float32)  # low-contrast stones, bushes and cloud puffs
    for _ in range(rng.integers(3, 8)):
        center = (int(rng.integers(w)), int(rng.integers(h)))
        axes = (int(rng.integers(w // 40, w // 10)), int(rng.integers(h // 60, h // 16)))
        cv2.ellipse(clutter, center, axes, 0, 0, 360, float(rng.uniform(-0.07, 0.07)), -1)
    return canvas * (1 + cv2.GaussianBlur(clutter, (0, 0), 3)[..., None])


def _object_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A filled shape covering 3-25 % of the frame at a random position, as a bool mask."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    angles = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    if shape == "disc":
        points = np.stack([np.cos(angles), np.sin(angles)], 1)
    elif shape == "ellipse":
        points = np.stack([np.cos(angles), rng.uniform(0.45, 0.8) * np.sin(angles)], 1)
    elif shape == "rounded_rectangle":
        # A superellipse is a rectangle with rounded corners; the exponent sets the corner radius.
        power = 2 / rng.uniform(4, 10)
        cos, sin = np.cos(angles), np.sin(angles)
        points = np.stack([np.sign(cos) * np.abs(cos) ** power,
                           rng.uniform(0.5, 1.0) * np.sign(sin) * np.abs(sin) ** power], 1)
    elif shape == "polygon":
        corners = np.sort(rng.uniform(0, 2 * np.pi, rng.integers(3, 8)))
        corners = np.linspace(0, 2 * np.pi, len(corners), endpoint=False) * 0.7 + corners * 0.3
        points = np.stack([np.cos(corners), np.sin(corners)], 1) * rng.uniform(0.8, 1.0, (len(corners), 1))
    else:  # blob: a circle with a few low-frequency bumps
        radius = np.ones_like(angles)
        for freq in (2, 3, 5):
            radius += rng.uniform(0.05, 0.15) * np.cos(freq * angles + rng.uniform(0, 2 * np.pi))
        points = np.stack([np.cos(angles), np.sin(angles)], 1) * radius[:, None]
    rotation = rng.uniform(0, 2 * np.pi)
    points = points @ np.array([[np.cos(rotation), -np.sin(rotation)], [np.sin(rotation), np.cos(rotation)]])
    area = 0.5 * abs(np.dot(points[:, 0], np.roll(points[:, 1], 1)) - np.dot(points[:, 1], np.roll(points[:, 0], 1)))
    points *= np.sqrt(rng.uniform(0.03, 0.25) * h * w / area)
    # Fit the shape inside the frame (shrinking it if needed) with a margin, at a random position.
    margin = 0.03 * min(h, w)
    extent = points.max(0) - points.min(0)
    points *= min(1.0, (w - 2 * margin) / extent[0], (h - 2 * margin) / extent[1])
    low = margin - points.min(0)
    high = np.array([w, h]) - margin - points.max(0)
    points += rng.uniform(low, np.maximum(low, high))
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [np.round(points * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return mask.astype(bool)


def _object_paint(rng: np.random.Generator, mask: np.ndarray, light_x: float) -> np.ndarray:
    """Float RGB paint for an object whose mask fills this crop: a saturated colour shaded by a side light,
    a rounded rim and grain."""
    h, w = mask.shape
    colour = _hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0.55, 0.95), rng.uniform(0.6, 0.95))
    gx = np.linspace(-1, 1, w, dtype=np.float32)[None, :] * light_x
    gy = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
    shade = 1 + 0.12 * (gx - gy) / 2  # lit from the upper side opposite the shadow
    # Darken towards the outline so the object reads as a rounded solid.
    depth = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3)
    shade = shade * (0.8 + 0.2 * np.minimum(depth / (0.15 * np.sqrt(mask.sum())), 1))
    shade *= 1 + 0.03 * _smooth_noise(rng, h, w, 24)
    return colour[None, None, :] * shade[..., None]
