"""The stage contract.

A stage is a Ray actor class: `__init__` builds its workers once per actor, `__call__(batch)` takes a
pyarrow batch of rows (manifests.schema.ROW_SCHEMA) and returns the batch for the next stage. Rows another
stage ended pass through untouched; rows this stage ends leave with their reason and without their images.
A worker exception on one row fails that row (error class and message in the ledger), never the batch; a
`Rejected` raised for a row ends it as rejected with its reason code.
The columns a stage requires and adds are checked on every batch, so a renamed column fails loudly.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from manifests.config import Strict
from manifests.images import contact_thumb, decode_image
from manifests.rejected import Rejected
from manifests.schema import FAILED, HEAVY_COLUMNS, LIVE, REJECTED, ROW_SCHEMA


class Resources(Strict):
    """How a stage is scheduled. Fractional CPUs keep small machines from deadlocking (environment.md)."""

    num_cpus: float = Field(0.5, gt=0)
    num_gpus: float = Field(0, ge=0)
    min_actors: int = Field(1, ge=1)
    max_actors: int = Field(2, ge=1)
    batch_size: int = Field(8, ge=1)
    # Custom Ray resources each actor needs, to place a stage on chosen nodes: `ray start --resources
    # '{"editor": 4}'` on the editing nodes and `resources: {editor: 1}` here.
    resources: dict[str, float] = {}

    @model_validator(mode="after")
    def _pool(self):
        if self.max_actors < self.min_actors:
            raise ValueError(f"max_actors ({self.max_actors}) < min_actors ({self.min_actors})")
        return self


@dataclass(frozen=True)
class StageContext:
    seed: int
    recipe_hash: str
    run_dir: str


OWN_IMAGE_MAX_PIXELS = 1 << 28  # rows carry images the source stage already checked and resized


def decode_own(data: bytes) -> np.ndarray:
    """Decode an image this pipeline encoded itself (a row's src/edited), through the same safe decoder."""
    return decode_image(data, max_pixels=OWN_IMAGE_MAX_PIXELS)


class ContractError(RuntimeError):
    """A stage received or produced rows that break its declared column contract."""


MESSAGE_CHARS = 2000  # a ledger message is kept to this length


def end_row(row: dict, status: str, stage: str, reason: str, message: str = "", keep_images: bool = False) -> dict:
    """End a row: it keeps its metadata and scores for the ledger and drops its images (a thumbnail of
    them stays, so reports can show what was rejected). `keep_images`: the score policy's rejections keep
    them, so that `python -m pipeline refilter` can accept the pair under a looser policy without re-running
    anything."""
    out = {**row, "status": status, "stage": stage, "reason": reason, "message": message[:MESSAGE_CHARS]}
    images = [row[c] for c in ("src", "edited") if row.get(c)]
    if images and not row.get("thumb"):
        out["thumb"] = contact_thumb(images)
    if not keep_images:
        out.update(dict.fromkeys(HEAVY_COLUMNS))
    return out


class Stage:
    name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()
    adds: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg, ctx: StageContext):
        self.cfg, self.ctx = cfg, ctx

    def process_row(self, row: dict) -> list[dict]:
        """One live row in, the rows it becomes out (ended rows via `end_row`)."""
        raise NotImplementedError

    def process(self, rows: list[dict]) -> list[dict]:
        """A batch of live rows. Batched model backends override this; the default goes row by row."""
        out = []
        for row in rows:
            try:
                out.extend(self.process_row(row))
            except Rejected as e:  # a gate or an unusable output: a reason code, not an error
                out.append(end_row(row, REJECTED, self.name, e.reason, e.message))
            except Exception as e:  # recorded in the ledger; the batch and the run go on
                out.append(self.fail(row, e))
        return out

    def fail(self, row: dict, error: BaseException) -> dict:
        where = traceback.extract_tb(error.__traceback__)[-1:] if error.__traceback__ else []
        at = f" at {where[0].filename.rsplit('/', 1)[-1]}:{where[0].lineno}" if where else ""
        return end_row(row, FAILED, self.name, type(error).__name__, f"{error}{at}")

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        live = [r for r in rows if r["status"] == LIVE]
        passed = [r for r in rows if r["status"] != LIVE]
        self._check(live, self.requires, "requires")
        start = time.perf_counter()
        out = self.process(live)
        per_row = (time.perf_counter() - start) / max(len(out), 1)
        for row in out:
            row[f"t_{self.name}"] = per_row
        self._check([r for r in out if r["status"] == LIVE], self.adds, "adds")
        return to_table(passed + out)

    def _check(self, rows: list[dict], columns: tuple[str, ...], what: str) -> None:
        for row in rows:
            missing = [c for c in columns if row.get(c) is None]
            if missing:
                raise ContractError(f"stage {self.name!r} {what} columns {missing}, "
                                    f"missing on unit {row.get('unit_id')!r}")


def to_table(rows: list[dict]) -> pa.Table:
    unknown = set().union(*(r.keys() for r in rows)) - set(ROW_SCHEMA.names) if rows else set()
    if unknown:
        raise ContractError(f"rows carry columns outside the pair schema: {sorted(unknown)}")
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


class StageGroup:
    """Consecutive stages in one actor: rows pass from one stage to the next in memory instead of through
    Ray's object store and another actor pool. Worth it on small CPU machines (see bench/README.md); keep
    stages with different resources (a GPU editor, a CPU scorer) apart. Each stage keeps its contract."""

    def __init__(self, cfg: list[tuple[type, object, dict]], ctx: StageContext):
        """`cfg`: per stage, its class, its config and its extra keyword arguments."""
        self.stages = [cls(stage_cfg, ctx, **kwargs) for cls, stage_cfg, kwargs in cfg]

    def __call__(self, batch: pa.Table) -> pa.Table:
        for stage in self.stages:
            batch = stage(batch)
        return batch
