"""Pack stage: the release layout. Accepted pairs are interleaved by task within windows of a few thousand
pairs in input order (every shard carries its window's task mix; plan_shards says why not the whole corpus's),
cut into shards of `shard_size`, and written as deterministic tars, each committed by its Parquet manifest.
Every pair carries the same members (json, src.jpg, edited.jpg, mask.png), so stock readers (HF `datasets`,
Ray Data) read the shards with their defaults: the mask of a region edit marks the region the edit is about,
that of a global edit the whole image, and the json's `mask` says which.
The plan is a pure function of the committed score-stage rows, so a rerun rebuilds the
same plan, skips committed shards and rewrites only the missing ones.
"""
from __future__ import annotations

import io
import json
import struct
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image
from pydantic import Field

from manifests.config import Strict
from manifests.images import encode_mask, sha256_hex
from manifests.mix import smooth_wrr
from manifests.schema import LIVE, stable_hash
from manifests.shards import MANIFEST_SCHEMA, shard_name, write_shard
from manifests.storage import StorePath, store_path
from manifests.taxonomy import task_by_name
from stages.base import Stage


class PackConfig(Strict):
    prefix: str = Field("x2edit", pattern=r"^[A-Za-z0-9_-]+$")
    shard_size: int = Field(100, ge=1)  # pairs per shard


PLAN_COLUMNS = ("unit_id", "status", "task", "position")  # what plan_shards reads of the rows (+ read_units')
WINDOW_PAIRS = 4096  # pairs read and interleaved together: the pack's unit of locality (see plan_shards)


@dataclass
class ShardPlan:
    """`order`: one row per planned unit, in shard order (unit_id, _fragment, _row: where its row lies, shard:
    the shard's index, _index: its row in the table the plan was made from); `shards`: per shard its name,
    plan_hash, window and [start, stop) in `order`."""

    order: pa.Table
    shards: list[dict]

    def jobs(self, skip: set[str]) -> pa.Table:
        """One pack job per window, with the shards not in `skip`: a job reads its window's rows once. A table of
        one row per job (its shards' names, plan hashes and sizes, and its units' unit_id, _fragment, _row as
        list columns): Arrow, not a Python object per planned unit (~130 MB of them at a million units)."""
        by_window: dict[int, list[dict]] = defaultdict(list)
        for shard in self.shards:
            if shard["shard"] not in skip:
                by_window[shard["window"]].append(shard)
        per_job = [window for _, window in sorted(by_window.items())]
        shards = [s for window in per_job for s in window]
        shard_offsets = np.cumsum([0, *map(len, per_job)])
        unit_offsets = np.cumsum([0, *(sum(s["stop"] - s["start"] for s in window) for window in per_job)])
        take = np.concatenate([np.arange(s["start"], s["stop"]) for s in shards] or [np.array([], np.int64)])
        units = self.order.take(take)

        def lists(values, offsets: np.ndarray) -> pa.ListArray:
            return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)

        return pa.table({
            "shards": lists(pa.array([s["shard"] for s in shards], pa.string()), shard_offsets),
            "plan_hashes": lists(pa.array([s["plan_hash"] for s in shards], pa.string()), shard_offsets),
            "sizes": lists(pa.array([s["stop"] - s["start"] for s in shards], pa.int64()), shard_offsets),
            **{k: lists(units.column(k).combine_chunks(), unit_offsets) for k in ("unit_id", "_fragment", "_row")}})

    def shard_column(self, num_rows: int) -> pa.Array:
        """The shard name of each row of the planned table (null for rows not planned: the ended ones)."""
        names = pa.array([s["shard"] for s in self.shards], pa.string())
        index = np.full(num_rows, -1, np.int64)
        index[self.order.column("_index").to_numpy()] = self.order.column("shard").to_numpy()
        return pc.take(names, pa.array(index, mask=index < 0))


def plan_shards(rows: pa.Table, cfg: PackConfig) -> ShardPlan:
    """The shards of the deduplicated last-stage rows (read_units' table with PLAN_COLUMNS at least).

    A pure function of the rows, not of how they were batched into fragments, so a resumed, fused or per-stage
    run packs byte-identical shards. Live rows in input order (position, then unit id) are cut into windows of
    WINDOW_PAIRS (a whole number of shards); inside a window the tasks are interleaved, and the window is cut
    into shards. Rows are committed in about input order, so a window's rows lie in a few neighbouring
    fragment row groups: the pack job of a window reads them once (RowReader), where a global
    interleave made every shard read rows from all over the run. The price: a shard carries its window's task
    mix (within two pairs per task: see interleave_within) rather than the whole corpus's."""
    live = rows.select([*PLAN_COLUMNS, "_fragment", "_row"])  # sorted and taken below: no other column
    live = live.append_column("_index", pa.array(np.arange(rows.num_rows), pa.int64()))
    live = live.filter(pc.equal(live.column("status"), LIVE))
    live = live.take(pc.sort_indices(live, [("position", "ascending"), ("unit_id", "ascending")]))
    per_window = cfg.shard_size * max(1, WINDOW_PAIRS // cfg.shard_size)
    window = np.arange(live.num_rows) // per_window
    live = live.take(interleave_within(window, live.column("task")))
    local = np.arange(live.num_rows) - window * per_window  # window is sorted: each window kept its place
    shard = window * (per_window // cfg.shard_size) + local // cfg.shard_size
    order = live.select(["unit_id", "_fragment", "_row", "_index"]).append_column("shard", pa.array(shard))
    starts = np.flatnonzero(np.diff(shard, prepend=-1)) if len(shard) else np.array([], np.int64)
    stops = np.append(starts[1:], len(shard))
    units = order.column("unit_id")
    shards = [{"shard": shard_name(cfg.prefix, i), "window": int(window[a]), "start": int(a), "stop": int(b),
               "plan_hash": stable_hash(*units.slice(a, b - a).to_pylist())}
              for i, (a, b) in enumerate(zip(starts, stops))]
    return ShardPlan(order, shards)


def interleave_within(window: np.ndarray, tasks: pa.ChunkedArray) -> np.ndarray:
    """A permutation that interleaves the tasks inside each window (`window`: non-decreasing), keeping each
    task's rows in their order: manifests.mix's smooth weighted round robin over the window's task counts
    (tasks in name order), so at every point of a window each task is within one pair of its share, and any
    stretch of it (a shard) within two."""
    encoded = pa.chunked_array(tasks, pa.string()).combine_chunks().dictionary_encode()
    by_name = np.argsort(np.array(encoded.dictionary.to_pylist(), dtype=object))
    codes = np.empty(len(by_name), np.int64)
    codes[by_name] = np.arange(len(by_name))
    codes = codes[encoded.indices.to_numpy()] if len(window) else codes[:0]
    perm = np.empty(len(window), np.int64)
    starts = np.flatnonzero(np.diff(window, prepend=-1))
    for a, b in zip(starts, [*starts[1:], len(window)]):
        counts = np.bincount(codes[a:b])
        picks = np.array(smooth_wrr(dict(enumerate(counts.tolist())), b - a))
        # the k-th slot the sequence gives a task takes that task's k-th row
        perm[a + np.argsort(picks, kind="stable")] = a + np.argsort(codes[a:b], kind="stable")
    return perm


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


class RowReader:
    """The rows of one pack job, read from the fragments a row group at a time when first needed and kept
    only until written: each row group holding the job's rows is read once, and memory holds the rows read
    but not yet written (a few row groups when the rows lie in input order, the job's window at worst).
    `bytes_read` counts the file bytes it read (footers included)."""

    def __init__(self, rows_dir: StorePath | str, fragments: list[str], rows: list[int]):
        self.rows_dir = store_path(rows_dir)
        self.wanted: dict[str, list[int]] = defaultdict(list)
        for frag, row in zip(fragments, rows):
            self.wanted[frag].append(row)
        self.open: dict[str, tuple] = {}  # fragment → its file, row-group starts, row groups still due
        self.pending: dict[tuple[str, int], dict] = {}
        self.bytes_read = 0

    def take(self, frag: str, row: int) -> dict:
        if (frag, row) not in self.pending:
            self._read(frag, row)
        return self.pending.pop((frag, row))

    def _open(self, frag: str) -> tuple[pq.ParquetFile, np.ndarray, set[int]]:
        file = (self.rows_dir / frag).open()  # kept open while row groups are due; one request per read remotely
        size = file.size()  # the footer alone (pyarrow would read the file's last 64 kB for it)
        length = struct.unpack("<I", file.read_at(4, size - 8))[0]
        meta = pq.read_metadata(pa.BufferReader(file.read_at(length + 8, size - 8 - length)))
        self.bytes_read += length + 16
        starts = np.cumsum([0, *(meta.row_group(g).num_rows for g in range(meta.num_row_groups))])
        due = set((np.searchsorted(starts, self.wanted[frag], side="right") - 1).tolist())
        return pq.ParquetFile(file, metadata=meta), starts, due

    def _read(self, frag: str, row: int) -> None:
        if frag not in self.open:
            self.open[frag] = self._open(frag)
        file, starts, due = self.open[frag]
        group = int(np.searchsorted(starts, row, side="right")) - 1
        table = file.read_row_group(group)
        meta = file.metadata.row_group(group)
        self.bytes_read += sum(meta.column(c).total_compressed_size for c in range(meta.num_columns))
        due.discard(group)
        if not due:  # every row group of the job's rows in this fragment is read: let the file go
            del self.open[frag]
            file.close(force=True)  # we opened its source
        wanted = [r for r in self.wanted[frag] if starts[group] <= r < starts[group + 1]]
        picked = table.take(pa.array([r - starts[group] for r in wanted], pa.int64())).to_pylist()
        self.pending.update({(frag, r): p for r, p in zip(wanted, picked)})


class PackStage(Stage):
    """Writes the shards of the pack jobs it is given (rows of ShardPlan.jobs); returns one summary row per
    shard."""

    name = "pack"

    def __init__(self, cfg: PackConfig, ctx, rows_dir: str, out_dir: str):
        super().__init__(cfg, ctx)
        self.rows_dir, self.out_dir = store_path(rows_dir), store_path(out_dir)
        self._masks: dict[tuple[int, int], bytes] = {}

    def __call__(self, batch: pa.Table) -> pa.Table:
        summaries = [s for job in batch.to_pylist() for s in self.write_job(job)]
        return pa.table({"summary": [json.dumps(s) for s in summaries]})

    def _whole_image_mask(self, image: bytes) -> bytes:
        """The mask of a global edit: the whole image (a few hundred bytes of PNG, cached per size)."""
        size = Image.open(io.BytesIO(image)).size  # reads the header only
        if size not in self._masks:
            self._masks[size] = encode_mask(np.ones(size[::-1], bool))
        return self._masks[size]

    def write_job(self, job: dict, reader: RowReader | None = None) -> list[dict]:
        reader = reader or RowReader(self.rows_dir, job["_fragment"], job["_row"])
        summaries, start = [], 0
        for shard, plan_hash, size in zip(job["shards"], job["plan_hashes"], job["sizes"]):
            rows = [reader.take(f, r) for f, r in zip(job["_fragment"][start:start + size],
                                                      job["_row"][start:start + size])]
            if [r["unit_id"] for r in rows] != job["unit_id"][start:start + size]:
                raise RuntimeError(f"{shard}: the score-stage fragments changed since the plan was made")
            summaries.append(self.write(shard, plan_hash, rows))
            start += size
        return summaries

    def write(self, shard: str, plan_hash: str, rows: list[dict]) -> dict:
        members, manifest = [], []
        for row in rows:
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
                "shard": shard, "task_zh": task_by_name(row["task"]).name_zh,
                "region_mask": region, "members": [n for n, _ in files],
                "member_sha256": [sha256_hex(d) for _, d in files], "recipe_hash": self.ctx.recipe_hash})
        table = with_score_columns(pa.Table.from_pylist(manifest, schema=MANIFEST_SCHEMA))
        return write_shard(self.out_dir, shard, members, table, {"plan_hash": plan_hash})


def with_score_columns(table: pa.Table) -> pa.Table:
    """Flatten the scores JSON into nullable float columns `score_<name>` for SQL-style queries."""
    parsed = [json.loads(s) for s in table.column("scores").to_pylist()]
    for name in sorted(set().union(*parsed)) if parsed else []:
        values = [p.get(name) for p in parsed]
        table = table.append_column(f"score_{name}", pa.array(values, pa.float64()))
    return table
