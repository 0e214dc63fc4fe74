"""Pack stage: the release layout. Accepted pairs are interleaved by task (every shard carries the corpus's
task mix), cut into shards of `shard_size`, and written as deterministic tars, each committed by its
Parquet manifest. Every pair carries the same members (json, src.jpg, edited.jpg, mask.png), so stock
readers (HF `datasets`, Ray Data) read the shards with their defaults: the mask of a region edit marks the
region the edit is about, that of a global edit the whole image, and the json's `mask` says which.
The plan is a pure function of the committed score-stage rows, so a rerun rebuilds the
same plan, skips committed shards and rewrites only the missing ones.
"""
from __future__ import annotations

import io
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image
from pydantic import Field

from manifests.config import Strict
from manifests.images import encode_mask, sha256_hex
from manifests.mix import interleave
from manifests.schema import LIVE, stable_hash
from manifests.shards import MANIFEST_SCHEMA, shard_name, write_shard
from manifests.taxonomy import task_by_name
from stages.base import Stage


class PackConfig(Strict):
    prefix: str = Field("x2edit", pattern=r"^[A-Za-z0-9_-]+$")
    shard_size: int = Field(100, ge=1)  # pairs per shard


def plan_shards(rows: pa.Table, cfg: PackConfig) -> list[dict]:
    """Shard plans from the deduplicated last-stage rows (needs unit_id, status, task, _fragment)."""
    live = rows.filter(pc.equal(rows.column("status"), LIVE))
    groups: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for unit, task, frag in zip(live.column("unit_id").to_pylist(), live.column("task").to_pylist(),
                                live.column("_fragment").to_pylist()):
        groups[task].append((unit, frag))
    for items in groups.values():
        items.sort()
    order = interleave(dict(sorted(groups.items())))
    plans = []
    for index, start in enumerate(range(0, len(order), cfg.shard_size)):
        chunk = order[start:start + cfg.shard_size]
        plans.append({"shard": shard_name(cfg.prefix, index), "units": [u for u, _ in chunk],
                      "fragments": [f for _, f in chunk], "plan_hash": stable_hash(*(u for u, _ in chunk))})
    return plans


def pair_json(row: dict, mask: str) -> dict:
    """The pair's `<key>.json`: the same fields and types in every record (manifests.shards.RECORD_JSON_FIELDS
    says why), with `mask` telling whether mask.png marks a region or the whole image."""
    provenance = {**json.loads(row["provenance"]), "seed": row["seed"], "editor": row["editor"]}
    return {
        "pair_id": row["pair_id"], "task": row["task"], "task_id": row["task_id"],
        "task_zh": task_by_name(row["task"]).name_zh, "op": row["op"], "editor": row["editor"],
        "instruction_en": row["instruction_en"], "instruction_zh": row["instruction_zh"],
        "width": row["width"], "height": row["height"], "seed": row["seed"], "mask": mask,
        "sample_id": row["sample_id"], "source_uri": row["source_uri"],
        "params": row["params"], "scores": row["scores"], "thresholds": row["thresholds"] or "[]",
        "subject": row["subject"] or "null", "source_meta": row["source_meta"] or "{}",
        "provenance": json.dumps(provenance, ensure_ascii=False, sort_keys=True),
    }


class PackStage(Stage):
    """Writes the shards of the plans it is given; returns one summary row per shard."""

    name = "pack"

    def __init__(self, cfg: PackConfig, ctx, rows_dir: str, out_dir: str):
        super().__init__(cfg, ctx)
        self.rows_dir, self.out_dir = Path(rows_dir), Path(out_dir)
        self._masks: dict[tuple[int, int], bytes] = {}

    def __call__(self, batch: pa.Table) -> pa.Table:
        summaries = [self.write(plan) for plan in batch.to_pylist()]
        return pa.table({"summary": [json.dumps(s) for s in summaries]})

    def _whole_image_mask(self, image: bytes) -> bytes:
        """The mask of a global edit: the whole image (a few hundred bytes of PNG, cached per size)."""
        size = Image.open(io.BytesIO(image)).size  # reads the header only
        if size not in self._masks:
            self._masks[size] = encode_mask(np.ones(size[::-1], bool))
        return self._masks[size]

    def _load(self, plan: dict) -> dict[str, dict]:
        by_fragment: dict[str, list[str]] = defaultdict(list)
        for unit, frag in zip(plan["units"], plan["fragments"]):
            by_fragment[frag].append(unit)
        rows = {}
        for frag, units in sorted(by_fragment.items()):
            table = pq.read_table(self.rows_dir / frag, filters=[("unit_id", "in", units)])
            for row in table.to_pylist():
                rows.setdefault(row["unit_id"], row)
        return rows

    def write(self, plan: dict) -> dict:
        rows = self._load(plan)
        members, manifest = [], []
        for unit in plan["units"]:
            row = rows[unit]
            key = row["pair_id"]
            region = row["mask"] is not None
            record = pair_json(row, "region" if region else "whole_image")
            files = [(f"{key}.json", json.dumps(record, ensure_ascii=False, sort_keys=True).encode()),
                     (f"{key}.src.jpg", row["src"]), (f"{key}.edited.jpg", row["edited"]),
                     (f"{key}.mask.png", row["mask"] if region else self._whole_image_mask(row["edited"]))]
            members.extend(files)
            manifest.append({
                **{k: row[k] for k in ("pair_id", "sample_id", "source_uri", "task", "task_id", "op", "editor",
                                       "instruction_en", "instruction_zh", "seed", "width", "height", "scores")},
                "shard": plan["shard"], "task_zh": task_by_name(row["task"]).name_zh,
                "region_mask": region, "members": [n for n, _ in files],
                "member_sha256": [sha256_hex(d) for _, d in files], "recipe_hash": self.ctx.recipe_hash})
        table = with_score_columns(pa.Table.from_pylist(manifest, schema=MANIFEST_SCHEMA))
        return write_shard(self.out_dir, plan["shard"], members, table, {"plan_hash": plan["plan_hash"]})


def with_score_columns(table: pa.Table) -> pa.Table:
    """Flatten the scores JSON into nullable float columns `score_<name>` for SQL-style queries."""
    parsed = [json.loads(s) for s in table.column("scores").to_pylist()]
    for name in sorted(set().union(*parsed)) if parsed else []:
        values = [p.get(name) for p in parsed]
        table = table.append_column(f"score_{name}", pa.array(values, pa.float64()))
    return table
