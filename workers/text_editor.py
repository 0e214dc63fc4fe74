"""Text change gated by OCR, after the reference's TextFlux expert (reference-code.md §1.6): the region is
re-drawn on the CPU (renderer classical) or by a FluxFillPipeline such as TextFlux (renderer fill), and PP-OCRv4
(the ONNX models inside the rapidocr-onnxruntime wheel) does both of Qwen2.5-VL's jobs there: reading the text
to change and checking the result.

Recipe block:

    backend: text
    min_area: 0.01           # the largest text region must cover >= 1 % of the image (the reference's gate)
    min_confidence: 0.8      # OCR confidence of that region's string
    words: text_words.yaml   # replacement words per language: a file in prompts/, or a path
    languages: [en]          # zh too with a CJK font, e.g. /usr/share/fonts/truetype/wqy/wqy-microhei.ttc
    font: null               # a TrueType/OpenType file; null: the font inside Pillow (Latin glyphs only)
    threads: 1               # onnxruntime threads per model: actors of a pool each own a share of the CPUs
    renderer: classical      # or fill: a FluxFillPipeline re-draws the region (TextFlux, §1.6), with a `fill:`
                             # block (workers/text_fill.py)

propose: OCR the image; keep the largest confident region (a quadrilateral) and its string; choose a new word
of the same language from the word list (length within 3 characters, letter case matched); write the
instruction from prompts/text_change.yaml.
edit, renderer classical: straighten the region; split its pixels into text and background along their main
colour axis (Otsu; the region's border is background, as the detector pads the text); paint the strokes out with
Telea inpainting; render the new word where the old one stood (same ink height for the old word in this font,
narrowed to fit, the old text's colour).
edit, renderer fill: the new word's glyph template (TextFlux's layout) is warped onto the region at the model's
edit size, and the pipeline re-draws the region from it; the result replaces the source inside the region only
(workers/text_fill.py).
Either way the round trip follows: OCR the edited image, and the text read inside the region must equal the new
word after `normalize` (NFKC, case-folded, letters and digits only), else the pair is rejected as
`text_not_read_back`. Equality, not containment, so a half-erased old word also fails.

Install (rapidocr-onnxruntime requires opencv-python, which would overwrite opencv-contrib's `cv2/`):
    pip install --no-deps rapidocr-onnxruntime==1.4.4 && pip install pyclipper shapely onnxruntime six
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import yaml
from PIL import Image, ImageDraw, ImageFont
from pydantic import Field, model_validator

from manifests.config import Strict
from manifests.rejected import Rejected
from workers.base import EditOutput, EditRequest, Proposal, Subject
from workers.model_lifecycle import ItemFailed
from workers.text_fill import FillConfig, FillJob, TextFill, glyph_template
from workers.text_regions import (Language, Reading, choose_word, inside, language_of, normalize, quad_area,
                                  quad_mask, quad_size, straighten, strokes)

VERSION = "1"
TASK = "text_change"
OP = "text.replace"
OCR_PACKAGE = "rapidocr_onnxruntime"
TEXT_FILL = 0.92  # the new word may span this fraction of the region's width
FILL_MARGIN = 0.1  # the fill renderer's mask grows by this fraction of the region's height


@functools.cache
def _yaml(name: str) -> dict:
    """A data file: a path, or the name of a file in prompts/."""
    path = Path(name)
    source = path if path.is_absolute() else resources.files("prompts").joinpath(name)
    return yaml.safe_load(source.read_text("utf-8"))


@functools.cache
def ocr_models() -> dict[str, str]:
    """The OCR's ONNX files (name → sha256 prefix) as shipped in the installed wheel, for provenance."""
    spec = importlib.util.find_spec(OCR_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{OCR_PACKAGE} is not installed: pip install --no-deps rapidocr-onnxruntime==1.4.4 "
                          "(its opencv-python requirement would replace opencv-contrib's cv2) "
                          "and pip install pyclipper shapely onnxruntime six")
    models = Path(spec.submodule_search_locations[0]) / "models"
    return {path.name: _sha256_prefix(path) for path in sorted(models.glob("*.onnx"))}


class TextEditor:
    backend = "text"
    follows_instructions = False

    class Config(Strict):
        backend: Literal["text"] = "text"
        min_area: float = Field(0.01, gt=0, le=1)
        min_confidence: float = Field(0.8, ge=0, le=1)
        words: str = "text_words.yaml"
        languages: tuple[Language, ...] = ("en",)
        font: str | None = None
        threads: int = Field(1, ge=1)
        renderer: Literal["classical", "fill"] = "classical"
        fill: FillConfig | None = None  # the fill renderer's model and settings

        @model_validator(mode="after")
        def _cjk_needs_a_font(self) -> TextEditor.Config:
            if "zh" in self.languages and self.font is None:
                raise ValueError("languages: zh needs `font`, a file with CJK glyphs (Pillow's own has Latin only)")
            return self

        @model_validator(mode="after")
        def _fill_block(self) -> TextEditor.Config:
            if (self.renderer == "fill") != (self.fill is not None):
                raise ValueError("renderer: fill needs a `fill` block (its model and settings), and only it takes one")
            return self

    def __init__(self, cfg: Config | None = None):
        self.cfg = cfg or self.Config()
        self._ocr: Any = None  # RapidOCR, loaded at first use: it is heavy, and covers() must stay cheap
        self._fill = TextFill(self.cfg.fill) if self.cfg.fill else None  # loads its pipeline at the first edit

    def covers(self) -> frozenset[str]:
        return frozenset({TASK})

    def read(self, image: np.ndarray) -> list[Reading]:
        """Every line of text the OCR reads in an RGB image, in reading order."""
        if self._ocr is None:
            ocr_models()  # says how to install the OCR when it is missing
            from rapidocr_onnxruntime import RapidOCR
            self._ocr = RapidOCR(intra_op_num_threads=self.cfg.threads)
        lines, _ = self._ocr(np.ascontiguousarray(image[..., ::-1]))  # it takes arrays as BGR
        return [Reading(np.float32(quad), text, float(score)) for quad, text, score in lines or []]

    def propose(self, task: str, image: np.ndarray, subject: Subject | None,
                rng: np.random.Generator) -> Proposal | None:
        if task != TASK:
            return None
        readings = [r for r in self.read(image) if r.score >= self.cfg.min_confidence and normalize(r.text)]
        if not readings:
            return None
        region = max(readings, key=lambda r: quad_area(r.quad))
        width, height = quad_size(region.quad)
        if quad_area(region.quad) < self.cfg.min_area * image.shape[0] * image.shape[1] or height > width:
            return None  # too small to matter, or vertical text (the renderer writes one horizontal line)
        language = language_of(region.text)
        if language not in self.cfg.languages:
            return None
        new = choose_word(region.text, _yaml(self.cfg.words)[language], rng)
        if new is None:
            return None
        templates = _yaml("text_change.yaml")["instructions"]
        template = templates[rng.integers(len(templates))]
        old = region.text.strip()
        return Proposal(task=TASK, op=OP,
                        params={"quad": np.round(region.quad, 1).tolist(), "old": old, "new": new,
                                "language": language, "ocr_score": round(region.score, 4)},
                        instruction_en=template["en"].format(old=old, new=new),
                        instruction_zh=template["zh"].format(old=old, new=new))

    def edit(self, images: list[np.ndarray], requests: list[EditRequest]) -> list[EditOutput | Rejected | ItemFailed]:
        for request in requests:
            if request.op != OP:
                raise KeyError(f"text editor has no op {request.op!r}")
        if self._fill is None:
            return [self._classical(image, request) for image, request in zip(images, requests)]
        jobs = [self._fill_job(self._fill, image, request) for image, request in zip(images, requests)]
        return [edited if isinstance(edited, ItemFailed) else self._read_back(job.source, edited, job.region, job.words)
                for job, edited in zip(jobs, self._fill.redraw(jobs))]

    def _classical(self, image: np.ndarray, request: EditRequest) -> EditOutput | Rejected:
        quad, old, new = np.float32(request.params["quad"]), request.params["old"], request.params["new"]
        to_rect, width, height = straighten(quad)
        crop = cv2.warpPerspective(image, to_rect, (width, height), flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_REPLICATE)
        ink = strokes(crop)
        if not ink.any():
            return Rejected("text_strokes_not_found", f"no text pixels inside the region of {old!r}")
        core = cv2.erode(ink.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0  # away from anti-aliasing
        colour = np.median(crop[core if core.any() else ink], axis=0)

        h, w = image.shape[:2]
        to_image = np.linalg.inv(to_rect)
        ys, xs = np.nonzero(ink)
        halo = max(2, (ys.max() - ys.min()) // 10)  # the anti-aliased and compressed edges of the old glyphs
        grow = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * halo + 1, 2 * halo + 1))
        hole = cv2.dilate(cv2.warpPerspective(ink.astype(np.uint8), to_image, (w, h), flags=cv2.INTER_NEAREST),
                          grow)
        # The detector's box can touch the glyphs; grown by the halo it holds every pixel the edit changes.
        region = cv2.dilate(quad_mask(quad, image.shape).astype(np.uint8), grow) > 0
        # Telea fills the thin ink smoothly from their edges. classical_region.remove_subject would borrow
        # texture from a neighbouring patch, and beside a line of text that is often more text (ghost letters).
        clean = cv2.inpaint(image, hole * region.astype(np.uint8), 3, cv2.INPAINT_TELEA)  # RGB order is moot

        glyphs = self._render(old, new, (xs.min(), ys.min(), xs.max(), ys.max()), width, height)
        alpha = cv2.warpPerspective(glyphs, to_image, (w, h), flags=cv2.INTER_LINEAR) * region
        alpha = alpha[..., None] / 255.0
        edited = np.clip(clean * (1 - alpha) + colour * alpha, 0, 255).round().astype(np.uint8)
        return self._read_back(image, edited, region, new)

    def _fill_job(self, fill: TextFill, image: np.ndarray, request: EditRequest) -> FillJob:
        """The new word's glyphs drawn straight, then warped onto the region as it stands, at the edit size."""
        h, w = fill.edit_size(*image.shape[:2])
        quad = np.float32(request.params["quad"])
        small = quad * np.float32([w / image.shape[1], h / image.shape[0]])
        to_rect, width, height = straighten(small)
        template = glyph_template(request.params["new"], width, height, self._font)
        glyphs = cv2.warpPerspective(template, np.linalg.inv(to_rect), (w, h), flags=cv2.INTER_LINEAR)
        # The reference masks its dataset's OCR polygon as is; PP-OCRv4's box can cut through the outer strokes
        # (see `_classical`), and what stays outside the mask stays in the picture: the mask gets a margin.
        margin = max(2, round(FILL_MARGIN * quad_size(quad)[1]))
        grow = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1, 2 * margin + 1))
        region = cv2.dilate(quad_mask(quad, image.shape).astype(np.uint8), grow)
        mask = cv2.resize(region, (w, h), interpolation=cv2.INTER_AREA) > 0  # every cell the region touches
        return FillJob(source=image, region=region > 0, glyphs=glyphs, mask=mask, words=request.params["new"],
                       seed=request.seed)

    def _read_back(self, image: np.ndarray, edited: np.ndarray, region: np.ndarray, new: str) -> EditOutput | Rejected:
        """The gate of both renderers: the OCR must read exactly the new word inside the region."""
        read = "".join(r.text for r in self.read(edited) if inside(r.quad, region))
        if normalize(read) != normalize(new):
            return Rejected("text_not_read_back", f"OCR read {read!r} in the region, expected {new!r}")
        return EditOutput(source=image, edited=edited, mask=region)

    def _render(self, old: str, new: str, ink: tuple[int, int, int, int], width: int, height: int) -> np.ndarray:
        """uint8 coverage (height, width) of `new` in the straightened region, centred on the old ink box."""
        x0, y0, x1, y1 = ink
        # The size at which this font draws the OLD text as tall as it stood: it keeps the letter size even
        # when the words differ in ascenders and descenders.
        probe = 100
        _, old_top, _, old_bottom = self._font(probe).getbbox(old, anchor="ls")
        left, top, right, bottom = self._font(probe).getbbox(new, anchor="ls")
        size = probe * min((y1 - y0 + 1) / max(old_bottom - old_top, 1), TEXT_FILL * width / max(right - left, 1))
        font = self._font(max(1, round(size)))
        left, top, right, bottom = font.getbbox(new, anchor="ls")
        origin = ((x0 + x1 - left - right) / 2, (y0 + y1 - top - bottom) / 2)
        canvas = Image.new("L", (width, height), 0)
        ImageDraw.Draw(canvas).text(origin, new, font=font, fill=255, anchor="ls")
        return np.asarray(canvas)

    def _font(self, size: int) -> ImageFont.FreeTypeFont:
        if self.cfg.font is None:
            return ImageFont.load_default(size=size)
        return ImageFont.truetype(self.cfg.font, size)

    def provenance(self) -> dict:
        font = self._font(12)
        return {"worker": self.backend, "version": VERSION,
                "ocr": {"package": f"rapidocr-onnxruntime {importlib.metadata.version('rapidocr-onnxruntime')}",
                        "models": ocr_models()},
                "font": {"name": " ".join(font.getname()),
                         "file": self.cfg.font or f"bundled with Pillow {importlib.metadata.version('pillow')}",
                         "sha256": _sha256_prefix(self.cfg.font) if self.cfg.font else None},
                "chooser": "word_list", "words": self.cfg.words, "languages": list(self.cfg.languages),
                "renderer": self.cfg.renderer,
                **({"fill": {**self._fill.provenance(), "mask_margin": FILL_MARGIN}} if self._fill else {}),
                "round_trip": "normalized OCR text in the region == new text"}


def _sha256_prefix(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
