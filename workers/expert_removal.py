"""Subject removal and addition by the reference's expert chain (reference-code.md §1.3): tag the image, find each
tag's boxes with Grounding DINO, segment them with SAM 2, gate the mask, inpaint it with LaMa. Addition is the
reversed pair: the inpainted image is the source, the photograph the target.

Recipe block (defaults are the reference's settings and the models closest to its checkpoints):

    backend: expert_removal
    lama: /models/big-lama.pt                        # TorchScript file, or a folder / tiny:lama holding big-lama.pt
    clip_model: openai/clip-vit-large-patch14        # the tagger
    grounding_model: IDEA-Research/grounding-dino-tiny   # Swin-T, O365+GoldG+Cap4M: the reference's SwinT-OGC
    sam2_model: facebook/sam2.1-hiera-large
    tasks: [subject_removal, subject_addition]

Tagger: CLIP zero-shot over prompts/removal_tags.yaml (workers/clip_tagger.py says why not RAM++); the `tag_top_k`
best tags whose probability reaches `tag_threshold` are tried in order.
Gates, per tag, as the reference: the mask covers `min_area`..`max_area` of the image, and at least
`min_foreground` of it is foreground. The reference's foreground map is RMBG-2.0 (trust_remote_code, not loaded
here); this one is classical (FOREGROUND). `propose` tries the tags in order and takes the first that passes
every gate (the reference's `break`), or proposes nothing. `edit` dilates that mask and inpaints it.
"""
from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Iterator, Literal

import numpy as np
import yaml
from pydantic import Field, model_validator

from manifests.config import Strict
from manifests.rejected import ItemFailed, Rejected
from workers.base import EditOutput, EditRequest, Proposal, Subject
from workers.clip_tagger import ClipTagger, Tag, data_text, load_vocabulary
from workers.grounding import Boxes, GroundingDino
from workers.lama import LamaInpainter, dilate
from workers.model_lifecycle import library_versions
from workers.segment_classical import describe_subject, find_subject
from workers.segment_sam2 import Sam2BoxSegmenter

VERSION = "1"
OPS = {"subject_removal": "expert.remove", "subject_addition": "expert.add"}
FOREGROUND = ("share of the mask's pixels inside the classical salient-object mask (workers/segment_classical."
              "find_subject: Lab colour contrast to the frame's borders, refined by GrabCut, largest component; "
              "nothing when it finds none); stricter than the reference's RMBG map (any nonzero pixel), "
              "as it keeps one object per image")
Task = Literal["subject_removal", "subject_addition"]


@dataclass(frozen=True)
class Finding:
    """One tag through the chain: `reason` is the first step or gate it failed, None when it passed them all."""

    tag: Tag
    tag_score: float
    reason: Literal["no_box", "mask_area", "not_foreground"] | None
    boxes: Boxes
    mask: np.ndarray | None = None  # bool (H, W): the union of the boxes' SAM masks
    area: float | None = None
    foreground: float | None = None

    def params(self) -> dict:
        return {"tag_en": self.tag.en, "tag_zh": self.tag.zh, "tag_score": round(self.tag_score, 4),
                "boxes": np.round(self.boxes.xyxy, 1).tolist(),
                "box_scores": np.round(self.boxes.scores, 4).tolist(),
                "mask_area": round(self.area, 4), "foreground_share": round(self.foreground, 4)}


class ExpertRemovalEditor:
    backend: ClassVar[str] = "expert_removal"
    follows_instructions: ClassVar[bool] = False

    class Config(Strict):
        backend: Literal["expert_removal"] = "expert_removal"
        tasks: tuple[Task, ...] = Field(("subject_removal", "subject_addition"), min_length=1)
        lama: str  # TorchScript file, or a folder / hub id (local cache) / tiny:lama holding big-lama.pt
        clip_model: str = "openai/clip-vit-large-patch14"
        clip_revision: str | None = None
        vocabulary: str = "removal_tags.yaml"  # a file in prompts/, or an absolute path
        tag_top_k: int = Field(5, ge=1)
        # A softmax probability over the vocabulary: not the reference tagger's 0.75, a sigmoid per tag.
        tag_threshold: float = Field(0.05, ge=0, le=1)
        grounding_model: str = "IDEA-Research/grounding-dino-tiny"
        grounding_revision: str | None = None
        box_threshold: float = Field(0.3, ge=0, le=1)
        text_threshold: float = Field(0.25, ge=0, le=1)
        sam2_model: str = "facebook/sam2.1-hiera-large"
        sam2_revision: str | None = None
        dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # CLIP, Grounding DINO, SAM 2; LaMa is fp32
        batch_size: int = Field(4, ge=1)  # LaMa images per forward pass
        min_area: float = Field(0.02, gt=0, le=1)  # mask area gate, fractions of the image
        max_area: float = Field(0.35, gt=0, le=1)
        min_foreground: float = Field(0.8, ge=0, le=1)
        dilation_kernel: int = Field(12, ge=1)  # square kernel side in pixels at `dilation_side`
        dilation_iterations: int = Field(2, ge=0)
        # The kernel scales with the image's short side: the margin covers SAM's edge error and the object's soft
        # outline and shadow, which scale with the image. The reference's 12 px were meant for ~1024-px (Kolors)
        # images; at 256 px they would grow the hole four times as much. null: a fixed kernel, as the reference.
        dilation_side: int | None = Field(1024, ge=1)

        @model_validator(mode="after")
        def _consistent(self) -> ExpertRemovalEditor.Config:
            if self.min_area >= self.max_area:
                raise ValueError(f"min_area {self.min_area} must be below max_area {self.max_area}")
            if len(set(self.tasks)) != len(self.tasks):
                raise ValueError(f"tasks are listed twice: {list(self.tasks)}")
            return self

    def __init__(self, cfg: Config) -> None:
        """Loads nothing but the vocabulary and templates: each model loads at its first use."""
        self.cfg = cfg
        self.vocabulary = load_vocabulary(cfg.vocabulary)
        self._templates = yaml.safe_load(data_text("removal_instructions.yaml"))
        self.tagger = ClipTagger(cfg.clip_model, cfg.clip_revision, cfg.dtype, self.vocabulary, cfg.tag_top_k,
                                 cfg.tag_threshold)
        self.detector = GroundingDino(cfg.grounding_model, cfg.grounding_revision, cfg.dtype, cfg.box_threshold,
                                      cfg.text_threshold)
        self.segmenter = Sam2BoxSegmenter(cfg.sam2_model, cfg.sam2_revision, cfg.dtype)
        self.inpainter = LamaInpainter(cfg.lama, cfg.batch_size)
        self.step_seconds: dict[str, float] = defaultdict(float)  # time per step, loads included, since built
        self._last: tuple[bytes, Finding | None] | None = None  # the last image's choice: tasks share an image
        self._libraries = library_versions("torch", "transformers", "opencv-contrib-python-headless")

    def covers(self) -> frozenset[str]:
        return frozenset(self.cfg.tasks)

    @contextmanager
    def _timed(self, step: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.step_seconds[step] += time.perf_counter() - start

    def findings(self, image: np.ndarray) -> Iterator[Finding]:
        """Every tag the tagger offers, through detection, segmentation and the gates, lazily and in order."""
        with self._timed("tag"):
            tags = self.tagger.tag(image)
        foreground: np.ndarray | None = None  # computed once, when the first mask reaches its gate
        for tag, score in tags:
            with self._timed("ground"):
                boxes = self.detector.detect(image, tag.en)
            if not len(boxes.scores):
                yield Finding(tag, score, "no_box", boxes)
                continue
            with self._timed("segment"):
                mask = self.segmenter.segment(image, boxes.xyxy)
            area = float(mask.mean())
            if not self.cfg.min_area <= area <= self.cfg.max_area:
                yield Finding(tag, score, "mask_area", boxes, mask, area)
                continue
            if foreground is None:
                with self._timed("foreground"):
                    salient = find_subject(image)
                foreground = salient.mask if salient is not None else np.zeros(mask.shape, bool)
            share = float((mask & foreground).sum() / mask.sum())
            yield Finding(tag, score, None if share >= self.cfg.min_foreground else "not_foreground",
                          boxes, mask, area, share)

    def _chosen(self, image: np.ndarray) -> Finding | None:
        key = hashlib.blake2b(image.tobytes() + str(image.shape).encode(), digest_size=16).digest()
        if self._last is None or self._last[0] != key:
            self._last = key, next((f for f in self.findings(image) if f.reason is None), None)
        return self._last[1]

    def propose(self, task: str, image: np.ndarray, subject: Subject | None,
                rng: np.random.Generator) -> Proposal | None:
        """The first tag that passes every gate, as a pair of `task` (the instructor's subject is not used: the
        chain finds its own region and hands it on as the proposal's subject)."""
        if task not in self.cfg.tasks:
            return None
        found = self._chosen(image)
        if found is None:
            return None
        template = self._templates[task]
        return Proposal(task=task, op=OPS[task], params=found.params(),
                        instruction_en=template["en"].format(en=found.tag.en),
                        instruction_zh=template["zh"].format(zh=found.tag.zh),
                        subject=describe_subject(image, found.mask))

    def hole(self, mask: np.ndarray) -> np.ndarray:
        """The mask dilated as the reference does, the kernel scaled to the image (see `dilation_side`)."""
        kernel = self.cfg.dilation_kernel
        if self.cfg.dilation_side is not None:
            kernel = max(1, round(kernel * min(mask.shape) / self.cfg.dilation_side))
        return dilate(mask, kernel, self.cfg.dilation_iterations)

    def edit(self, images: list[np.ndarray],
             requests: list[EditRequest]) -> list[EditOutput | Rejected | ItemFailed]:
        if len(images) != len(requests):
            raise ValueError(f"{len(images)} images for {len(requests)} requests")
        holes = []
        for image, request in zip(images, requests):
            if request.op not in OPS.values():
                raise KeyError(f"expert_removal has no op {request.op!r}")
            if request.subject is None or request.subject.mask.shape != image.shape[:2]:
                raise ValueError(f"{request.op} needs the mask its proposal found, at the image's size")
            holes.append(self.hole(request.subject.mask))
        with self._timed("inpaint"):
            filled = self.inpainter.inpaint(images, holes)
        outputs: list[EditOutput | Rejected | ItemFailed] = []
        for image, hole, result, request in zip(images, holes, filled, requests):
            if isinstance(result, (Rejected, ItemFailed)):
                outputs.append(result)
            elif request.op == OPS["subject_removal"]:
                outputs.append(EditOutput(source=image, edited=result, mask=hole))
            else:  # the reversed pair: the photograph is the target
                outputs.append(EditOutput(source=result, edited=image, mask=hole))
        return outputs

    def provenance(self) -> dict:
        """Every model (id, resolved revision, dtype), threshold and gate; each model's load time once loaded."""
        cfg, parts = self.cfg, {"tagger": self.tagger, "grounding": self.detector, "segmentation": self.segmenter,
                                "inpainting": self.inpainter}
        return {"worker": self.backend, "version": VERSION,
                **{name: part.provenance() for name, part in parts.items()},
                "gates": {"mask_area": [cfg.min_area, cfg.max_area], "min_foreground": cfg.min_foreground,
                          "foreground": FOREGROUND},
                "dilation": {"kernel": cfg.dilation_kernel, "iterations": cfg.dilation_iterations,
                             "kernel_at_short_side": cfg.dilation_side},
                "libraries": self._libraries,
                "load_seconds": {name: part.load_seconds for name, part in parts.items()}}
