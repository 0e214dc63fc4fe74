"""Generated source images with real, legible text: shop signs, labels and posters on a wall.

They give the text-change editor (workers/text_editor.py) something to edit in the default run, where no
photograph with text ships. Every image is deterministic by its index, and the text is drawn with the font
that ships inside Pillow (Aileron Regular, `ImageFont.load_default(size)`, Pillow >= 10.1), so it looks the
same on every machine; that font has Latin glyphs only, hence the words are English.
"""
from __future__ import annotations

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIZES = ((512, 512), (512, 640), (640, 512), (512, 768))  # (height, width)
KINDS = ("sign", "label", "poster")
WORDS = ("BAKERY", "CAFE", "HOTEL", "BOOKS", "MARKET", "GARAGE", "PIZZA", "FLOWERS", "MUSEUM", "STATION",
         "LIBRARY", "GALLERY", "BARBER", "DINER", "PHARMACY", "TICKETS", "PARKING", "CINEMA", "BAZAAR",
         "Bakery", "Tea House", "Records", "Studio", "Harbor")
TAGLINES = ("OPEN DAILY", "SINCE 1987", "WELCOME", "EST. 2004", "FRESH EVERY DAY", "ALL WEEK", "CITY CENTRE")
_SEED_SALT = 20_261_129  # keeps these seeds apart from the scene generator's


def generate_text_sample(index: int) -> tuple[np.ndarray, str]:
    """(RGB uint8 image, its main text): the largest line of text in the image, as drawn."""
    rng = np.random.default_rng([_SEED_SALT, index])
    h, w = SIZES[rng.integers(len(SIZES))]
    kind = KINDS[index % len(KINDS)]
    word = str(WORDS[rng.integers(len(WORDS))])
    tagline = str(TAGLINES[rng.integers(len(TAGLINES))])
    canvas = Image.fromarray(_wall(rng, h, w))
    board = _board(rng, kind, word, tagline, w)
    # Bilinear: bicubic rings, a bright seam along dark strokes that no camera would show.
    board = board.rotate(float(rng.uniform(-6, 6)), resample=Image.Resampling.BILINEAR, expand=True)
    x = int(rng.integers(0, max(1, w - board.width)))
    y = int(rng.integers(0, max(1, h - board.height)))
    shadow = Image.new("RGBA", board.size, (0, 0, 0, 0))
    shadow.putalpha(board.getchannel("A").point(lambda a: a * 0.35))  # a soft drop shadow lifts it off the wall
    canvas.paste(shadow, (x + 6, y + 8), shadow)
    canvas.paste(board, (x, y), board)
    image = np.asarray(canvas, dtype=np.float32)
    image += rng.standard_normal(image.shape[:2] + (1,), dtype=np.float32) * 2.0  # faint sensor grain
    return np.clip(image, 0, 255).round().astype(np.uint8), word


def _wall(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A plastered wall: a muted colour lit from one side, with blotchy low-frequency texture."""
    colour = np.float32(rng.uniform(90, 220, 3))
    light = np.linspace(rng.uniform(0.85, 1.0), rng.uniform(0.85, 1.0), w, dtype=np.float32)[None, :, None]
    coarse = rng.standard_normal((6, 6), dtype=np.float32)
    blotches = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)[..., None]
    return np.clip(colour * light * (1 + 0.04 * blotches), 0, 255).astype(np.uint8)


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _board(rng: np.random.Generator, kind: str, word: str, tagline: str, image_w: int) -> Image.Image:
    """An RGBA board with the word large and, on signs and posters, a smaller tagline below it."""
    dark = tuple(int(v) for v in rng.integers(10, 70, 3))
    light = tuple(int(v) for v in rng.integers(215, 255, 3))
    ink, paper = (light, dark) if rng.random() < 0.5 else (dark, light)
    size = {"sign": int(rng.integers(56, 84)), "label": int(rng.integers(40, 56)),
            "poster": int(rng.integers(60, 80))}[kind]
    left, _, right, _ = _font(size).getbbox(word, anchor="ls")
    size = min(size, int(size * 0.9 * image_w / (right - left + size)))  # the board (word + padding) fits
    lines = [(word, _font(size))]
    if kind != "label":
        lines.append((tagline, _font(max(18, size // 3))))
    # Ink boxes relative to each line's baseline: (left, top < 0, right, bottom >= 0).
    boxes = [font.getbbox(text, anchor="ls") for text, font in lines]
    pad, gap = size // 2, size // 4
    board_w = max(right - left for left, _, right, _ in boxes) + 2 * pad
    board_h = sum(bottom - top for _, top, _, bottom in boxes) + gap * (len(lines) - 1) + 2 * pad
    if kind == "poster":
        board_h = max(board_h, int(board_w * 1.2))  # posters are portrait; the text sits in the upper part
    board = Image.new("RGBA", (board_w, board_h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(board)
    draw.rounded_rectangle((0, 0, board_w - 1, board_h - 1), 0 if kind == "poster" else size // 4,
                           fill=paper + (255,), outline=ink + (255,), width=max(2, size // 16))
    y = pad
    for (text, font), (_, top, _, bottom) in zip(lines, boxes):
        draw.text((board_w // 2, y - top), text, font=font, fill=ink + (255,), anchor="ms")
        y += bottom - top + gap
    if kind == "poster":  # a setting sun over stripes fills the picture area below the title
        radius = min(board_w, board_h - y) // 4
        centre = (board_w // 2, (y + board_h) // 2)
        draw.ellipse((centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius), fill=ink)
        for stripe in range(centre[1], board_h - pad, max(4, radius // 3)):
            draw.rectangle((pad, stripe, board_w - pad, stripe + max(2, radius // 8)), fill=paper)
    return board
