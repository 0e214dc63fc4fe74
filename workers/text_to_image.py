"""Text-to-image: synthetic source images from prompts (reference §1.9–§1.10, which draws its sources with
shuttle-3-diffusion, a FLUX-family model: 1024², 4 steps, guidance 3.5, max_sequence_length 256), through a
diffusers FLUX pipeline by hub id or folder (`tiny:flux` on CPU), loaded once and lazily."""
from __future__ import annotations

import time
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from manifests.config import Strict
from manifests.rejected import ItemFailed
from workers.model_lifecycle import (LazyModel, ModelSource, diffusers_pipeline, library_versions, need,
                                     resolve_model, run_batched)

VERSION = "1"


class TextToImage:
    backend: ClassVar[str] = "diffusers"

    class Config(Strict):
        backend: Literal["diffusers"] = "diffusers"
        model: str  # e.g. shuttleai/shuttle-3-diffusion or black-forest-labs/FLUX.1-dev; tiny:flux on CPU
        revision: str | None = None
        dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
        steps: int = Field(4, ge=1)  # §1.10: 4 steps (a distilled model)
        guidance: float = Field(3.5, ge=0)
        size: int = Field(1024, ge=64, multiple_of=16)  # square, as the reference draws its sources
        max_sequence_length: int = Field(256, ge=1, le=512)
        suffix: str = ""  # appended to every prompt, e.g. ", Solid color background" (§1.10)
        batch_size: int = Field(1, ge=1)

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._pipe = LazyModel(self._load)
        self._source: ModelSource | None = None

    def _load(self):
        self._source = resolve_model(self.cfg.model, self.cfg.revision)
        return diffusers_pipeline("FluxPipeline", self._source, self.cfg.dtype)

    def generate(self, prompts: list[str], seeds: list[int]) -> list[np.ndarray | ItemFailed]:
        """One RGB uint8 image per prompt; each depends only on its prompt and seed."""
        pipe, torch = self._pipe.get(), need("torch")
        start = time.perf_counter()

        def call(items: list[tuple[str, int]]) -> list[np.ndarray]:
            generators = [torch.Generator("cpu").manual_seed(seed) for _, seed in items]
            out = pipe(prompt=[p + self.cfg.suffix for p, _ in items], height=self.cfg.size, width=self.cfg.size,
                       num_inference_steps=self.cfg.steps, guidance_scale=self.cfg.guidance,
                       max_sequence_length=self.cfg.max_sequence_length, generator=generators, output_type="np")
            return [np.asarray(np.clip(image * 255 + 0.5, 0, 255), np.uint8) for image in out.images]

        images = run_batched(call, list(zip(prompts, seeds)), self.cfg.batch_size)
        self.last_call_seconds = time.perf_counter() - start
        return images

    def provenance(self) -> dict:
        pipe = self._pipe.model  # the dtype and device really used, once loaded
        return {"worker": "text_to_image", "version": VERSION, "model": self.cfg.model,
                "revision": (self._source and self._source.revision) or self.cfg.revision,
                "dtype": str(pipe.dtype).removeprefix("torch.") if pipe else self.cfg.dtype,
                "device": pipe.device.type if pipe else None,
                "steps": self.cfg.steps, "guidance": self.cfg.guidance, "size": self.cfg.size,
                "max_sequence_length": self.cfg.max_sequence_length, "suffix": self.cfg.suffix,
                "libraries": library_versions("diffusers", "torch"), "load_seconds": self._pipe.load_seconds}
