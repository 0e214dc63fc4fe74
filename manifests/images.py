"""Safe image decoding and deterministic encoding.

`decode_image` is the one place where untrusted image bytes meet a decoder. It must never crash a worker:
every failure becomes an `Rejected` with a short reason code that ends up in the rejection ledger.
Pillow's global state (MAX_IMAGE_PIXELS, LOAD_TRUNCATED_IMAGES) is left untouched: our own pixel limit is
checked from the header before decoding; Pillow's own bomb guard stays on as a second check and its
error maps to the same reason code.
"""
from __future__ import annotations

import hashlib
import io
import struct
import zlib

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from manifests.rejected import Rejected

# The image files the corpus reads: extension -> the only Pillow decoder tried on it. The one list the input
# readers (tar members, folder files) and the decoder share, so neither accepts what the other drops; in the
# order of preference when one sample holds several images (GIF last: 256 colours). Only these decoders:
# Image.open would otherwise try ~40 plugins on hostile bytes, some of which shell out (EPS -> Ghostscript)
# or are rarely fuzzed.
IMAGE_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP",
                 "tif": "TIFF", "tiff": "TIFF", "gif": "GIF"}
_ALLOWED_FORMATS = tuple(dict.fromkeys(IMAGE_FORMATS.values()))

# Modes Pillow converts to RGB correctly. LAB is missing on purpose: Pillow's LAB->RGB is a raw channel
# copy, not a colour conversion. La/RGBa/HSV cannot come out of a file decoder.
_RGB_CONVERTIBLE = frozenset({"1", "L", "P", "RGB", "RGBX", "RGBA", "LA", "PA", "CMYK", "YCbCr"})
# Greyscale modes wider than 8 bits: scaled to 0..255, never clipped.
_HIGH_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})


def decode_image(data: bytes, *, max_pixels: int, warnings: list[str] | None = None) -> np.ndarray:
    """Decode to a writable RGB uint8 array (H, W, 3), EXIF orientation applied, alpha composited on white.

    An animated image (GIF, WebP, multi-page TIFF) gives its first frame, with a warning appended to
    `warnings` when given."""
    if not data:
        raise Rejected("empty_file", "zero bytes")
    try:
        with Image.open(io.BytesIO(data), formats=_ALLOWED_FORMATS) as im:
            width, height = im.size  # from the header only: nothing is decoded yet
            if width * height > max_pixels:
                raise Rejected("too_many_pixels", f"{width}x{height} exceeds max_pixels={max_pixels}")
            if im.mode not in _RGB_CONVERTIBLE and im.mode not in _HIGH_BIT:
                raise Rejected("unsupported_mode", f"mode {im.mode!r} ({im.format})")
            im.load()
            ImageOps.exif_transpose(im, in_place=True)
            image = _to_rgb(im)
            if warnings is not None and _has_more_frames(im):
                warnings.append(f"animated_image: a {im.format} with several frames; the first is used")
            return image
    except Rejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard (MAX_IMAGE_PIXELS) fired before our header check could run.
        raise Rejected("too_many_pixels", f"Pillow bomb guard: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise Rejected("not_an_image", f"not a {'/'.join(_ALLOWED_FORMATS)} image") from exc
    except EOFError as exc:
        raise Rejected("truncated_image", f"unexpected end of data: {exc}") from exc
    except OSError as exc:
        # Pillow reports short data as OSError("image file is truncated ..." / "Truncated File Read")
        # and every other decoder failure (bad zlib stream, broken tile) as a plain OSError too.
        reason = "truncated_image" if "truncated" in str(exc).lower() else "decode_error"
        raise Rejected(reason, str(exc)) from exc
    except (SyntaxError, ValueError, struct.error, zlib.error, IndexError) as exc:
        # What Pillow's plugins raise on malformed headers, chunks and EXIF blocks.
        raise Rejected("decode_error", f"{type(exc).__name__}: {exc}") from exc
    except MemoryError:
        raise  # an exhausted worker is not a property of the image
    except Exception as exc:  # noqa: BLE001 - hostile bytes reach deep into C decoders; keep the class name
        raise Rejected("decode_error", f"unexpected {type(exc).__name__}: {exc}") from exc


def header_size(data: bytes, *, max_pixels: int) -> tuple[int, int]:
    """(width, height) from an image's header, under decode_image's format allow-list and pixel limit, decoding
    no pixels (the trainer's index reads only the first bytes of each member). Raises Rejected."""
    try:
        with Image.open(io.BytesIO(data), formats=_ALLOWED_FORMATS) as im:
            width, height = im.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise Rejected("too_many_pixels", f"Pillow bomb guard: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise Rejected("not_an_image", f"not a {'/'.join(_ALLOWED_FORMATS)} image") from exc
    except (OSError, EOFError, SyntaxError, ValueError, struct.error, zlib.error) as exc:
        raise Rejected("decode_error", f"{type(exc).__name__}: {exc}") from exc
    if width * height > max_pixels:
        raise Rejected("too_many_pixels", f"{width}x{height} exceeds max_pixels={max_pixels}")
    return width, height


def _has_more_frames(im: Image.Image) -> bool:
    """Whether a second frame follows (only its header is read). Asked after the first frame is decoded, and
    a damaged rest counts as no frame: the sample is already usable and must not be lost to a note."""
    try:
        return bool(getattr(im, "is_animated", False))
    except (OSError, EOFError, SyntaxError, ValueError, struct.error, zlib.error, IndexError):
        return False  # what Pillow's plugins raise on a malformed frame after the first


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in _HIGH_BIT:
        grey = _scale_to_uint8(np.asarray(im), im.mode)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if im.has_transparency_data:  # alpha channel, palette alpha or a tRNS colour key
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im.convert("RGBA"))
    return np.array(im.convert("RGB"), dtype=np.uint8)


def _scale_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Map 16/32-bit integer or float greyscale onto 0..255 by its nominal range, else by its actual range."""
    values = np.nan_to_num(values.astype(np.float32))
    low, high = float(values.min()), float(values.max())
    if mode.startswith("I;16"):
        low, high = 0.0, 65535.0
    elif mode == "I" and low >= 0 and high <= 65535:  # 16-bit PNG/TIFF data widened to int32
        low, high = 0.0, 65535.0
    elif mode == "F" and low >= 0 and high <= 1:
        low, high = 0.0, 1.0
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _check_rgb(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 array (H, W, 3), got {image.dtype} {image.shape}")


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    """Baseline JPEG; Pillow writes no EXIF or timestamps, so equal arrays give equal bytes."""
    _check_rgb(image)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def encode_png(image: np.ndarray) -> bytes:
    _check_rgb(image)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_mask(mask: np.ndarray) -> bytes:
    """A boolean (H, W) mask as an 8-bit greyscale PNG with values 0 and 255."""
    if mask.dtype != np.bool_ or mask.ndim != 2:
        raise ValueError(f"expected a bool array (H, W), got {mask.dtype} {mask.shape}")
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_mask(data: bytes) -> np.ndarray:
    """Inverse of encode_mask; also accepts 1-bit PNGs. Values >= 128 are True."""
    with Image.open(io.BytesIO(data), formats=("PNG",)) as im:
        if im.mode not in ("L", "1"):
            raise ValueError(f"expected a greyscale mask PNG, got mode {im.mode!r}")
        return np.asarray(im.convert("L")) >= 128


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def contact_thumb(images: list[bytes], height: int = 96) -> bytes:
    """A small JPEG of the given (already validated) images side by side, for reports of ended rows."""
    tiles = []
    for data in images:
        with Image.open(io.BytesIO(data), formats=_ALLOWED_FORMATS) as im:
            im.draft("RGB", (height * 4, height))  # JPEG: decode at reduced scale, much faster
            im = im.convert("RGB")
            tiles.append(im.resize((max(1, round(im.width * height / im.height)), height), Image.Resampling.BILINEAR))
    sheet = Image.new("RGB", (sum(t.width for t in tiles) + 2 * (len(tiles) - 1), height), (255, 255, 255))
    x = 0
    for tile in tiles:
        sheet.paste(tile, (x, 0))
        x += tile.width + 2
    out = io.BytesIO()
    sheet.save(out, "JPEG", quality=80)
    return out.getvalue()
