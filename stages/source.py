"""Source stage: read input units, decode safely, check size and aspect, pre-filter, re-encode.

The pre-filter is the source's own score (a sidecar field such as `aesthetic_score`, else a heuristic stand-in)
and, when the recipe names one, the learned aesthetic predictor on every image that passes it:

    source:
      prefilter: {key: aesthetic_score, min: 5.0}
      aesthetic: {model: google/siglip-so400m-patch14-384, head: /models/aesthetic_predictor_v2_5.pth, min: 4.5}

`aesthetic` is then stored with the row's scores, and an image below its `min` is rejected (`low_aesthetic`).

Input rows are read units (a tar, a chunk of a folder, a chunk of the bundled samples), one per batch; the
stage yields sample rows in small batches so a big tar never sits in memory at once.
"""
from __future__ import annotations

import json
import math
import time
from typing import Iterator, Literal

import numpy as np
import pyarrow as pa
from PIL import Image
from pydantic import Field, model_validator

from filters.heuristics import quality_score
from manifests.config import Strict
from manifests.images import decode_image, encode_jpeg, encode_png
from manifests.inputs import InputUnit, RawSample, make_sample_id, plan_inputs, plan_prompts, read_unit
from manifests.rejected import ItemFailed, Rejected
from manifests.schema import FAILED, LIVE, REJECTED, empty_row, stable_seed
from stages.base import Stage, end_row, to_table
from workers import sample_images
from workers.prompt_check import KeywordPromptCheck
from workers.text_to_image import TextToImage
from workers.vision_encoders import AestheticModel, AestheticPredictor

POSITION_STRIDE = 1_000_000  # position = unit index * stride + ordinal in the unit
EMIT_EVERY = 8  # rows per yielded batch


class SyntheticInput(Strict):
    """Prompt files whose lines become synthetic sources, drawn by a text-to-image model (reference §1.9–
    §1.10); their rows join the input's like any sample, with the prompt in their source_meta."""

    paths: list[str]  # UTF-8 text files, one prompt per line; globs and brace patterns
    chunk_size: int = Field(8, ge=1)  # prompts per read task
    generator: TextToImage.Config
    check: KeywordPromptCheck.Config = KeywordPromptCheck.Config()


class InputConfig(Strict):
    kind: Literal["samples", "webdataset", "folder"] = "samples"
    paths: list[str] = []  # tar files / folders, globs allowed
    n_generated: int = Field(48, ge=0)  # generated scenes added to the bundled sample images
    n_text: int = Field(0, ge=0)  # generated signs with text (for the text-change workflow)
    chunk_size: int = Field(16, ge=1)  # samples per read task for folders and bundled samples
    max_member_bytes: int = Field(64 << 20, ge=1)
    synthetic: SyntheticInput | None = None  # sources drawn from prompts, in addition to the images

    @model_validator(mode="after")
    def _paths(self):
        if self.kind != "samples" and not self.paths:
            raise ValueError(f"input.paths is required when input.kind is {self.kind!r}")
        return self


class Prefilter(Strict):
    key: str = "aesthetic_score"  # sidecar field, as the reference's json pre-filter
    min: float | None = None  # below → rejected; the score is stored either way


class SourceAesthetic(AestheticModel):
    """Aesthetic Predictor V2.5 (reference §1.11) on each source image, as the reference gates its inputs
    (§1.5: aesthetic ≥ 4.5); the model loads on the first image that reaches it."""

    min: float | None = None  # below → rejected (low_aesthetic); the score is stored either way


class SourceConfig(Strict):
    min_side: int = Field(512, ge=1)
    max_aspect: float = Field(2.5, ge=1)
    max_pixels: int = Field(64_000_000, ge=1)  # decompression-bomb guard, checked before decoding
    work_short_side: int = Field(512, ge=0)  # resize so the short side is this; 0 keeps the size
    jpeg_quality: int = Field(95, ge=50, le=100)
    prefilter: Prefilter = Prefilter()
    aesthetic: SourceAesthetic | None = None  # the learned pre-filter, after the cheap one


def plan_units(cfg: InputConfig) -> list[dict]:
    """The read units of an input, as plain rows (the first dataset of a run)."""
    if cfg.kind == "samples":
        names = sample_images.list_samples(cfg.n_generated, cfg.n_text)
        chunks = [names[i:i + cfg.chunk_size] for i in range(0, len(names), cfg.chunk_size)]
        units = [InputUnit("samples", "samples", i, tuple(c)) for i, c in enumerate(chunks)]
    else:
        units = plan_inputs(cfg.kind, list(cfg.paths), cfg.chunk_size)
    if cfg.synthetic is not None:
        units += plan_prompts(list(cfg.synthetic.paths), cfg.synthetic.chunk_size, first_index=len(units))
    return [{"kind": u.kind, "uri": u.uri, "index": u.index, "members": list(u.members)} for u in units]


def read_samples(unit: InputUnit, cfg: InputConfig) -> Iterator[RawSample]:
    if unit.kind != "samples":
        yield from read_unit(unit, max_member_bytes=cfg.max_member_bytes)
        return
    for ordinal, name in enumerate(unit.members):
        yield RawSample(sample_id=make_sample_id("samples", name), source_uri=f"samples/{name}",
                        ordinal=ordinal, image=sample_images.load_sample(name), meta={}, caption=None,
                        error=None, warnings=[])


class SourceStage(Stage):
    name = "source"
    adds = ("src", "width", "height", "position", "sample_id")

    def __init__(self, cfg: tuple[InputConfig, SourceConfig], ctx, skip: frozenset[str] = frozenset()):
        super().__init__(cfg, ctx)
        self.input_cfg, self.source_cfg = cfg
        self.skip = skip  # sample ids already done (resume)
        synthetic = self.input_cfg.synthetic
        if synthetic is not None:  # built cheaply; the model loads on the first prompt unit
            self.generator, self.prompt_check = TextToImage(synthetic.generator), KeywordPromptCheck(synthetic.check)
        aesthetic = self.source_cfg.aesthetic
        self.aesthetic = AestheticPredictor(aesthetic) if aesthetic is not None else None  # loads nothing yet

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        for unit_row in batch.to_pylist():
            unit = InputUnit(unit_row["kind"], unit_row["uri"], unit_row["index"], tuple(unit_row["members"]))
            rows = []
            samples = self._synthesize(unit) if unit.kind == "prompts" else read_samples(unit, self.input_cfg)
            while True:
                start = time.perf_counter()  # reading (or drawing) the sample counts as its time too
                raw = next(samples, None)
                if raw is None:
                    break
                if raw.sample_id in self.skip:
                    continue
                row = self._row(raw, unit)
                row["t_source"] = time.perf_counter() - start
                rows.append(row)
                if len(rows) >= EMIT_EVERY:
                    yield self._checked(rows)
                    rows = []
            if rows:
                yield self._checked(rows)

    def _synthesize(self, unit: InputUnit) -> Iterator[RawSample]:
        """The unit's prompts, screened, then drawn in one batch: usable ones become samples with a PNG image
        and the prompt in their meta; a screened-out prompt is rejected (`invalid_prompt`), a drawing that
        fails (out of memory) fails its row."""
        todo, screened = [], {}
        for ordinal, member in enumerate(unit.members):
            line, prompt = json.loads(member)
            sample_id = make_sample_id(unit.uri, f"L{line}")
            if sample_id in self.skip:
                continue
            ok, why = self.prompt_check.check(prompt)
            if ok:
                todo.append((ordinal, line, prompt, sample_id))
            else:
                screened[ordinal] = RawSample(sample_id, f"{unit.uri}#L{line + 1}", ordinal, None, {"prompt": prompt},
                                              None, ("invalid_prompt", f"{self.prompt_check.name}: {why}"))
        images = self.generator.generate([p for _, _, p, _ in todo],
                                         [stable_seed(self.ctx.seed, s) for *_, s in todo]) if todo else []
        meta = {"prompt_check": self.prompt_check.name, "generator": self.generator.provenance()}
        for (ordinal, line, prompt, sample_id), image in zip(todo, images):
            failed = isinstance(image, ItemFailed)
            screened[ordinal] = RawSample(
                sample_id, f"{unit.uri}#L{line + 1}", ordinal, None if failed else encode_png(image),
                {"prompt": prompt, **meta}, prompt, (image.reason, image.message) if failed else None,
                failed=failed)
        return (screened[o] for o in sorted(screened))

    def _checked(self, rows: list[dict]) -> pa.Table:
        self._check([r for r in rows if r["status"] == LIVE], self.adds, "adds")
        return to_table(rows)

    def _row(self, raw: RawSample, unit: InputUnit) -> dict:
        row = empty_row()
        meta = {**raw.meta, **({"caption": raw.caption} if raw.caption is not None else {})}
        row.update(unit_id=raw.sample_id, sample_id=raw.sample_id, fanout=1, status=LIVE,
                   source_uri=raw.source_uri, position=unit.index * POSITION_STRIDE + raw.ordinal,
                   source_meta=json.dumps(meta, ensure_ascii=False, default=str), warnings=list(raw.warnings))
        if raw.error is not None:
            status = FAILED if raw.failed else REJECTED
            return end_row(row, status, self.name, raw.error[0], raw.error[1])
        try:
            return self._decode(row, raw, meta)
        except Rejected as e:
            return end_row(row, REJECTED, self.name, e.reason, e.message)
        except Exception as e:  # a bug or an unforeseen input: the sample fails, the run goes on
            return self.fail(row, e)

    def _decode(self, row: dict, raw: RawSample, meta: dict) -> dict:
        cfg = self.source_cfg
        image = decode_image(raw.image, max_pixels=cfg.max_pixels, warnings=row["warnings"])
        h, w = image.shape[:2]
        row.update(width=w, height=h)
        # Aspect first: a larger copy of the image could cure too_small, nothing cures the aspect.
        if max(h, w) / min(h, w) > cfg.max_aspect:
            return end_row(row, REJECTED, self.name, "bad_aspect_ratio",
                           f"{w}x{h}: aspect {max(h, w) / min(h, w):.2f} > {cfg.max_aspect}")
        if min(h, w) < cfg.min_side:
            return end_row(row, REJECTED, self.name, "too_small", f"{w}x{h}: short side < {cfg.min_side}")
        score, origin = self._prefilter(image, meta)
        row["scores"] = json.dumps({"prefilter": score})
        row["source_meta"] = json.dumps({**meta, "prefilter_from": origin}, ensure_ascii=False, default=str)
        if cfg.prefilter.min is not None and score < cfg.prefilter.min:
            row["thresholds"] = json.dumps([{"score": "prefilter", "min": cfg.prefilter.min}])
            return end_row(row, REJECTED, self.name, "prefilter", f"{origin} score {score:.3f} < {cfg.prefilter.min}")
        if self.aesthetic is not None:
            value, floor = self._aesthetic(row, image), cfg.aesthetic.min
            if floor is not None and value < floor:
                row["thresholds"] = json.dumps([{"score": "aesthetic", "min": floor}])
                return end_row(row, REJECTED, self.name, "low_aesthetic", f"aesthetic {value:.3f} < {floor}")
        image = resize_short_side(image, cfg.work_short_side)
        row.update(src=encode_jpeg(image, cfg.jpeg_quality), height=image.shape[0], width=image.shape[1])
        return row

    def _aesthetic(self, row: dict, image: np.ndarray) -> float:
        """The learned aesthetic score, added to the row's scores, and its model to the row's source_meta."""
        [value] = self.aesthetic.predict([image])
        if not math.isfinite(value):  # a broken model (fp16 overflow): it fails the row, never judges it
            raise ValueError(f"the aesthetic predictor gave {value}")
        row["scores"] = json.dumps({**json.loads(row["scores"]), "aesthetic": value})
        model = {**self.aesthetic.provenance(), "load_seconds": self.aesthetic.load_seconds}
        row["source_meta"] = json.dumps({**json.loads(row["source_meta"]), "aesthetic": model}, ensure_ascii=False)
        return value

    def _prefilter(self, image: np.ndarray, meta: dict) -> tuple[float, str]:
        value = meta.get(self.source_cfg.prefilter.key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
            return float(value), f"sidecar:{self.source_cfg.prefilter.key}"
        return quality_score(image), "heuristic:quality"


def resize_short_side(image: np.ndarray, short: int) -> np.ndarray:
    """Resize so the short side is `short` and both sides are multiples of 16 (what DiT editors expect)."""
    h, w = image.shape[:2]
    if short <= 0 or min(h, w) == short and h % 16 == 0 and w % 16 == 0:
        return image
    scale = short / min(h, w)
    size = (max(16, round(w * scale / 16) * 16), max(16, round(h * scale / 16) * 16))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))
