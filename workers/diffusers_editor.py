"""Instruction-following diffusion editors from diffusers (FLUX.1 Kontext, Qwen-Image-Edit) behind the Editor
interface: batched within a resolution bucket, seeded per pair, out-of-memory back-off.

Recipe block (defaults are the reference's Kontext settings, reference-code.md §1.8):

    backend: diffusers
    model: black-forest-labs/FLUX.1-Kontext-dev     # a hub id from the local cache, or a folder
    tasks: [style_change, tone_transformation, camera_movement]
    resolution: buckets                             # the 13 ~1 MP buckets; or a side, e.g. 512
    batch_size: 2

Each image is resized to its edit size (the nearest bucket, or the side's area at its own aspect), images of
one size are batched, and the edit is resized back to the source's size. The pipeline sees the pair's English
instruction. Seeds: one CPU torch.Generator per pair, seeded with the request's seed, draws its initial noise,
so an edit depends on its seed alone, not on the device or on which pairs shared its batch.
Qwen-Image-Edit encodes its reference image at ~1 MP whatever `resolution` says (diffusers hard-codes it);
`resolution` sets its output size. diffusers 0.42 has no Step1X-Edit pipeline; that editor needs its own worker.
"""
from __future__ import annotations

import math
import time
from functools import partial
from typing import Any, Callable, ClassVar, Literal

import numpy as np
from PIL import Image
from pydantic import Field, field_validator

from manifests.buckets import nearest_bucket
from manifests.config import Strict
from manifests.taxonomy import task_by_name
from workers.base import EditOutput, EditRequest
from workers.model_lifecycle import (ItemFailed, LazyModel, ModelSource, diffusers_pipeline, library_versions, need,
                                     resolve_model, run_batched)

VERSION = "1"  # bumped when what the editor does around the model (sizes, seeding, prompt) changes
Resolution = Literal["buckets"] | int


def _kontext_kwargs(guidance: float, batch: int, height: int, width: int) -> dict[str, Any]:
    # Kontext otherwise resizes every input to ~1 MP (its preferred sizes), whatever height/width say.
    return {"guidance_scale": guidance, "max_area": height * width, "_auto_resize": False}


def _qwen_kwargs(guidance: float, batch: int, height: int, width: int) -> dict[str, Any]:
    # Qwen-Image-Edit is not guidance-distilled: its guidance is true CFG, on only with a negative prompt.
    return {"true_cfg_scale": guidance, **({"negative_prompt": [" "] * batch} if guidance > 1 else {})}


# The pipelines this editor drives, with the call arguments each needs beyond the common ones.
PIPELINES: dict[str, Callable[[float, int, int, int], dict[str, Any]]] = {
    "FluxKontextPipeline": _kontext_kwargs,
    "QwenImageEditPipeline": _qwen_kwargs,
}


def edit_size(width: int, height: int, resolution: Resolution) -> tuple[int, int]:
    """(height, width) to edit at: the nearest ~1 MP bucket, or `resolution`² pixels at the image's aspect with
    sides in multiples of 16 (whole 2×2 tokens of FLUX's ×8 latent)."""
    if resolution == "buckets":
        return nearest_bucket(width, height)
    scale = resolution / math.sqrt(width * height)
    return max(16, round(height * scale / 16) * 16), max(16, round(width * scale / 16) * 16)


class DiffusersEditor:
    backend: ClassVar[str] = "diffusers"
    follows_instructions: ClassVar[bool] = True

    class Config(Strict):
        backend: Literal["diffusers"] = "diffusers"
        model: str  # hub id (read from the local Hugging Face cache) or folder
        revision: str | None = None  # branch, tag or commit of a hub id
        pipeline: Literal["FluxKontextPipeline", "QwenImageEditPipeline"] = "FluxKontextPipeline"
        dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
        steps: int = Field(28, ge=1)
        guidance: float = Field(2.5, ge=0)
        resolution: Resolution = "buckets"
        batch_size: int = Field(1, ge=1)  # per pipeline call; bench/kontext_gpu.py measures what more buys
        tasks: tuple[str, ...] = Field(min_length=1)  # what this model, so configured, is trusted to do
        max_sequence_length: int = Field(512, ge=1, le=512)  # T5 tokens of the instruction

        @field_validator("tasks")
        @classmethod
        def _canonical(cls, tasks: tuple[str, ...]) -> tuple[str, ...]:
            for name in tasks:
                task_by_name(name)  # names the known tasks when it fails
            if len(set(tasks)) != len(tasks):
                raise ValueError(f"tasks are listed twice: {sorted(t for t in set(tasks) if tasks.count(t) > 1)}")
            return tasks

        @field_validator("resolution")
        @classmethod
        def _side(cls, resolution: Resolution) -> Resolution:
            if resolution != "buckets" and (resolution < 64 or resolution % 16):
                raise ValueError(f"resolution {resolution} must be 'buckets' or a multiple of 16, at least 64")
            return resolution

    def __init__(self, cfg: Config, *, pipeline: Any = None) -> None:
        """Loads nothing: the model loads on the first `edit`. `pipeline` is one already built (the GPU
        benchmark's random full-size weights) to use instead of loading `cfg.model`."""
        self.cfg = cfg
        self._source: ModelSource | None = None
        self._pipe = LazyModel(self._load if pipeline is None else lambda: pipeline)
        self.last_call_seconds: float | None = None  # the last `edit`, load excluded
        self._libraries = library_versions("torch", "diffusers", "transformers")

    @property
    def load_seconds(self) -> float | None:
        return self._pipe.load_seconds

    def covers(self) -> frozenset[str]:
        return frozenset(self.cfg.tasks)

    def _load(self):
        self._source = resolve_model(self.cfg.model, self.cfg.revision)
        return diffusers_pipeline(self.cfg.pipeline, self._source, self.cfg.dtype)

    def edit(self, images: list[np.ndarray], requests: list[EditRequest]) -> list[EditOutput | ItemFailed]:
        if len(images) != len(requests):
            raise ValueError(f"{len(images)} images for {len(requests)} requests")
        pipe = self._pipe.get()
        start = time.perf_counter()
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(edit_size(image.shape[1], image.shape[0], self.cfg.resolution), []).append(i)
        done: dict[int, EditOutput | ItemFailed] = {}
        for size, indices in by_size.items():
            call = partial(self._run, pipe, size, images, requests)
            done.update(zip(indices, run_batched(call, indices, self.cfg.batch_size)))
        self.last_call_seconds = time.perf_counter() - start
        return [done[i] for i in range(len(images))]

    def _run(self, pipe, size_hw: tuple[int, int], images: list[np.ndarray], requests: list[EditRequest],
             chunk: list[int]) -> list[EditOutput]:
        """One pipeline call on the pairs `chunk` indexes, whose images share an edit size."""
        torch = need("torch")
        h, w = size_hw
        sources = [Image.fromarray(images[i]).resize((w, h), Image.Resampling.BICUBIC) for i in chunk]
        generators = [torch.Generator("cpu").manual_seed(requests[i].seed) for i in chunk]
        with torch.inference_mode():
            edited = pipe(image=sources, prompt=[requests[i].instruction_en for i in chunk], height=h, width=w,
                          num_inference_steps=self.cfg.steps, generator=generators,
                          max_sequence_length=self.cfg.max_sequence_length, output_type="pil",
                          **PIPELINES[self.cfg.pipeline](self.cfg.guidance, len(chunk), h, w)).images
        return [EditOutput(source=images[i], mask=None, edited=np.asarray(
                    result.convert("RGB").resize(images[i].shape[1::-1], Image.Resampling.BICUBIC)))
                for i, result in zip(chunk, edited)]

    def provenance(self) -> dict:
        """Settings, the model's resolved snapshot and the dtype/device it runs in (once loaded)."""
        cfg, pipe = self.cfg, self._pipe.model
        return {"worker": self.backend, "version": VERSION, "model": cfg.model, "pipeline": cfg.pipeline,
                "revision": (self._source and self._source.revision) or cfg.revision,
                "dtype": str(pipe.dtype).removeprefix("torch.") if pipe else cfg.dtype,
                "device": pipe.device.type if pipe else None,
                "steps": cfg.steps, "guidance": cfg.guidance, "resolution": cfg.resolution,
                "batch_size": cfg.batch_size, "max_sequence_length": cfg.max_sequence_length,
                "prompt": "instruction_en",
                "seeding": "per pair: torch.Generator('cpu').manual_seed(seed) draws the initial noise",
                "libraries": self._libraries,
                "load_seconds": self._pipe.load_seconds}
