"""The fill renderer of the text-change editor (workers/text_editor.py, `renderer: fill`): a diffusers
FluxFillPipeline re-draws the text region, fed as the reference feeds TextFlux (reference-code.md §1.6 step 6;
X2Edit's data_pipeline/run_inference.py, a copy of TextFlux's own):

- the scene at its edit size: short side `resolution`, the other in proportion, both floored to multiples of 32
  (the English script's `resize`, §1.6 step 5);
- a glyph panel of the same size: the new text in white on black where the region stands, laid out by
  `glyph_template` (the editor places it in the region);
- the diptych [glyphs | scene] side by side when the scene is taller than wide, else [glyphs / scene] stacked,
  and its mask [black | region]: the model re-draws the region, copying the glyphs' words in the scene's style;
- prompts: CLIP gets TextFlux's template without the words, T5 the same template naming them;
- 30 steps, guidance 30, 512 T5 tokens; the scene panel of the result, resized back to the source's size,
  replaces the source inside the region only.

Recipe block (under the text editor's `fill:`), the reference's model and settings:

    model: black-forest-labs/FLUX.1-Fill-dev
    transformer: yyyyyxie/textflux     # TextFlux's full-weight transformer, swapped into the Fill pipeline
    dtype: bfloat16
    steps: 30
    guidance: 30
    batch_size: 2
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Literal

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydantic import Field

from manifests.config import Strict
from workers.model_lifecycle import (ItemFailed, LazyModel, ModelSource, diffusers_pipeline, library_versions, need,
                                     pick_device, resolve_model, run_batched, torch_dtype)

VERSION = "1"  # bumped when the inputs built around the model (panel, layout, prompt, sizes) change
# TextFlux's prompt, as it was trained (TextFlux run_inference.py): CLIP reads it with `words` empty, T5 with the
# lines quoted. It is part of the checkpoint's interface, not an instruction to tune, hence a constant here.
# (X2Edit hands TextFlux's prompt builder the new text as a string where it expects a list of lines, so its T5
# prompt quotes every character: 'B', 'I', 'S', …; here the line is quoted whole, as TextFlux itself does.)
PROMPT = ("The pair of images highlights some white words on a black background, as well as their style on a "
          "real-world scene image. [IMAGE1] is a template image rendering the text, with the words{words}; "
          "[IMAGE2] shows the text content{words} naturally and correspondingly integrated into the image.")
LINE_HEIGHT = 0.8  # font size of a line that fits, in region heights (TextFlux's draw_glyph2)
SHRINK = 0.85  # span of a line too long for that, in region widths
MAX_SPACES = 98  # blanks between letters at most, where TextFlux's search stops
PROBE = 100  # font size at which lines are measured


class FillConfig(Strict):
    model: str  # a FluxFillPipeline: hub id (read from the local Hugging Face cache) or folder
    revision: str | None = None
    transformer: str | None = None  # a FluxTransformer2DModel used in place of the pipeline's own (TextFlux)
    transformer_revision: str | None = None
    transformer_subfolder: str | None = None  # where its config.json lies in that repo or folder (TextFlux: root)
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    steps: int = Field(30, ge=1)
    guidance: float = Field(30.0, ge=0)
    resolution: int = Field(512, ge=32)  # the scene's short side; the diptych is twice as long
    batch_size: int = Field(1, ge=1)
    max_sequence_length: int = Field(512, ge=1, le=512)  # T5 tokens of the prompt


@dataclass(frozen=True)
class FillJob:
    """One region to re-draw: the source and its region at the source's size, the model's inputs at the edit
    size (`TextFill.edit_size`)."""

    source: np.ndarray  # RGB uint8 (H, W, 3)
    region: np.ndarray  # bool (H, W)
    glyphs: np.ndarray  # uint8 (h, w): the new text, white on black, where it should stand
    mask: np.ndarray  # bool (h, w): the region to re-draw
    words: str
    seed: int


def glyph_template(text: str, width: int, height: int, font: Callable[[int], ImageFont.FreeTypeFont]) -> np.ndarray:
    """uint8 (height, width): one line of `text` across a straightened region, laid out as TextFlux lays out the
    glyph panels it was trained on (its draw_glyph2, for a horizontal line): a line that fits the width at a font
    size of the region's height is set at LINE_HEIGHT of that size, its letters spread apart with blanks while
    it still fits; a longer one is set to span SHRINK of the width. Centred on its ink box."""
    probe = font(PROBE)

    def span(line: str) -> float:  # ink width per unit of font size
        left, _, right, _ = probe.getbbox(line)
        return (right - left) / PROBE

    if height * span(text) <= width:
        spaces = 0
        while len(text) > 1 and spaces < MAX_SPACES and height * span((" " * (spaces + 1)).join(text)) <= width:
            spaces += 1
        line, size = (" " * spaces).join(text), LINE_HEIGHT * height
    else:
        line, size = text, SHRINK * width / span(text)
    face = font(max(1, int(size)))
    left, top, right, bottom = face.getbbox(line)
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).text(((width - right - left) / 2, (height - bottom - top) / 2), line, font=face, fill=255)
    return np.asarray(canvas)


class TextFill:
    """The pipeline, loaded once on the first `redraw`, and the diptych around each call."""

    def __init__(self, cfg: FillConfig) -> None:
        self.cfg = cfg
        self._sources: dict[str, ModelSource] = {}
        self._pipe = LazyModel(self._load)
        self._libraries = library_versions("torch", "diffusers", "transformers")

    def _load(self):
        diffusers = need("diffusers")
        cfg, device = self.cfg, pick_device()
        dtype = torch_dtype(cfg.dtype, device)
        self._sources["model"] = resolve_model(cfg.model, cfg.revision)  # first: a missing base fails before a load
        parts = {}
        if cfg.transformer is not None:
            source = self._sources["transformer"] = resolve_model(cfg.transformer, cfg.transformer_revision)
            parts["transformer"] = diffusers.FluxTransformer2DModel.from_pretrained(
                source.path, subfolder=cfg.transformer_subfolder, dtype=dtype, use_safetensors=True)
        return diffusers_pipeline("FluxFillPipeline", self._sources["model"], cfg.dtype, **parts)

    def edit_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the scene panel: short side `resolution`, sides floored to multiples of 32."""
        scale = self.cfg.resolution / min(height, width)
        return max(32, int(height * scale) // 32 * 32), max(32, int(width * scale) // 32 * 32)

    def redraw(self, jobs: list[FillJob]) -> list[np.ndarray | ItemFailed]:
        """Each job's source with its region re-drawn, in order. Jobs of one edit size share pipeline calls of up
        to `batch_size`, halved on out-of-memory."""
        pipe = self._pipe.get()
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, job in enumerate(jobs):
            by_size.setdefault(job.glyphs.shape, []).append(i)
        done: dict[int, np.ndarray | ItemFailed] = {}
        for indices in by_size.values():
            done.update(zip(indices, run_batched(partial(self._run, pipe, jobs), indices, self.cfg.batch_size)))
        return [done[i] for i in range(len(jobs))]

    def _run(self, pipe, jobs: list[FillJob], chunk: list[int]) -> list[np.ndarray]:
        torch = need("torch")
        h, w = jobs[chunk[0]].glyphs.shape
        axis = 1 if h > w else 0  # the panels side by side for a tall scene, stacked for a wide one
        panels, masks = [], []
        for job in (jobs[i] for i in chunk):
            glyphs = np.repeat(job.glyphs[..., None], 3, axis=2)
            scene = cv2.resize(job.source, (w, h), interpolation=cv2.INTER_AREA)
            panels.append(Image.fromarray(np.concatenate([glyphs, scene], axis)))
            mask = np.concatenate([np.zeros_like(job.mask), job.mask], axis)
            masks.append(Image.fromarray(mask.astype(np.uint8) * 255))
        generators = [torch.Generator("cpu").manual_seed(jobs[i].seed) for i in chunk]
        with torch.inference_mode():
            results = pipe(image=panels, mask_image=masks, prompt=[PROMPT.format(words="")] * len(chunk),
                           prompt_2=[PROMPT.format(words=f" '{jobs[i].words}'") for i in chunk],
                           height=panels[0].height, width=panels[0].width, num_inference_steps=self.cfg.steps,
                           guidance_scale=self.cfg.guidance, generator=generators,
                           max_sequence_length=self.cfg.max_sequence_length, output_type="pil").images
        edited = []
        for job, result in zip((jobs[i] for i in chunk), results):
            # The scene is the second panel either way: the bottom-right h × w block of the diptych. Only its
            # region is kept: the rest of the pair keeps the source's own pixels, not their trip through the VAE
            # and two resizes.
            redrawn = cv2.resize(np.asarray(result.convert("RGB"))[-h:, -w:], job.source.shape[1::-1],
                                 interpolation=cv2.INTER_CUBIC)
            edited.append(np.where(job.region[..., None], redrawn, job.source))
        return edited

    def provenance(self) -> dict:
        cfg, pipe = self.cfg, self._pipe.model
        source = self._sources.get("model")
        transformer = None
        if cfg.transformer is not None:
            loaded = self._sources.get("transformer")
            transformer = {"model": cfg.transformer, "subfolder": cfg.transformer_subfolder,
                           "revision": (loaded and loaded.revision) or cfg.transformer_revision}
        return {"version": VERSION, "pipeline": "FluxFillPipeline", "model": cfg.model,
                "revision": (source and source.revision) or cfg.revision, "transformer": transformer,
                "dtype": str(pipe.dtype).removeprefix("torch.") if pipe else cfg.dtype,
                "device": pipe.device.type if pipe else None,
                "steps": cfg.steps, "guidance": cfg.guidance, "resolution": cfg.resolution,
                "batch_size": cfg.batch_size, "max_sequence_length": cfg.max_sequence_length,
                "input": "diptych [glyph template | scene], mask [none | region]; scene panel kept",
                "prompt": "TextFlux template (CLIP without the words, T5 with them)",
                "seeding": "per pair: torch.Generator('cpu').manual_seed(seed) draws its noise",
                "libraries": self._libraries, "load_seconds": self._pipe.load_seconds}
