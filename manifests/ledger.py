"""The ledger: one row per unit of work with its terminal state.

accepted (the shard that holds it), rejected (stage, reason code, scores, thresholds) or failed (stage,
error class, message). Units are source samples until the instruct stage fans them out into pairs; a
source sample therefore appears once if it ended before fan-out, else once per candidate pair.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from manifests.commit import atomic_writer
from manifests.fragments import COMBINE_FRAGMENTS
from manifests.schema import ACCEPTED, LIVE, ROW_SCHEMA, ROW_STAGES
from manifests.storage import StorePath, parquet_schema, read_parquet, store_path

LEDGER_COLUMNS = ("unit_id", "sample_id", "pair_id", "status", "stage", "reason", "message", "warnings",
                  "source_uri", "task", "op", "editor", "instruction_en", "scores", "thresholds",
                  *(f"t_{stage}" for stage in ROW_STAGES))
LEDGER_SCHEMA = pa.schema([*(ROW_SCHEMA.field(c) for c in LEDGER_COLUMNS), ("shard", pa.string())])
LEDGER_NAME = "ledger.parquet"
PLAN_KEY = b"x2edit_plan"


def build_ledger(rows: pa.Table, shards: pa.Array) -> pa.Table:
    """Ledger rows from the last stage's rows; live rows are accepted into the shard named in `shards`
    (aligned with the rows; null for rows that ended). Arrow throughout: a million rows stay columns."""
    table = rows.select(list(LEDGER_COLUMNS))
    live = pc.equal(table.column("status"), LIVE)
    missing = pc.and_(live, pc.is_null(shards))
    if pc.any(missing).as_py():
        first = pc.filter(table.column("unit_id"), missing)
        raise ValueError(f"{len(first)} live units have no shard (first: {first[0].as_py()!r})")
    final = pc.if_else(live, ACCEPTED, table.column("status"))
    table = table.set_column(table.schema.get_field_index("status"), "status", final)
    return table.append_column("shard", pc.if_else(live, shards, pa.scalar(None, pa.string())))


def write_ledger(run_dir: Path | StorePath, rows_dir: Path | StorePath, units: pa.Table, shards: pa.Array,
                 plan: dict[str, dict]) -> StorePath:
    """Stream the ledger into its file, a few hundred fragments at a time, so that a run of millions of units
    holds one group's ledger columns, never the whole ledger. `units`: read_units' table of `rows_dir` (the kept
    copy of each unit: `_fragment`, `_row`, in fragment order); `shards`: aligned with it (build_ledger).
    `plan`: the stages' completion records, kept in the file's metadata, so a corpus copied without its stage
    outputs can still be checked against the units it was planned with."""
    path, rows_dir = store_path(run_dir) / LEDGER_NAME, store_path(rows_dir)
    fragment = units.column("_fragment").combine_chunks()
    codes, rows = fragment.indices.to_numpy(), units.column("_row").to_numpy()
    if np.any(np.diff(codes) < 0):
        raise ValueError("units are not in fragment order (read_units' table is)")
    names = fragment.dictionary.to_pylist()
    start = np.searchsorted(codes, np.arange(len(names) + 1))  # fragment k's units: start[k]:start[k + 1]
    schema = LEDGER_SCHEMA.with_metadata({PLAN_KEY: json.dumps(plan, sort_keys=True)})
    with atomic_writer(path) as f, pq.ParquetWriter(f, schema, compression="zstd") as writer:
        for first in range(0, len(names), COMBINE_FRAGMENTS):
            group = [k for k in range(first, min(first + COMBINE_FRAGMENTS, len(names))) if start[k + 1] > start[k]]
            if not group:
                continue
            parts = [read_parquet(rows_dir / names[k], list(LEDGER_COLUMNS)).take(rows[start[k]:start[k + 1]])
                     for k in group]
            lo, hi = start[group[0]], start[group[-1] + 1]
            writer.write_table(build_ledger(pa.concat_tables(parts), shards.slice(lo, hi - lo)).cast(schema))
    return path


def ledger_plan(path: Path | StorePath) -> dict[str, dict]:
    """The completion records a ledger was written against ({} for a ledger written before they existed)."""
    meta = parquet_schema(store_path(path)).metadata or {}
    return json.loads(meta[PLAN_KEY]) if PLAN_KEY in meta else {}


def read_ledger(run_dir: Path | StorePath, columns: list[str] | None = None, labels: list[str] = ()) -> pa.Table:
    """The ledger's columns; `labels` (columns of a few distinct values) dictionary-encoded, 4 B a row, with one
    dictionary across the file's row groups (the ledger is written a group of fragments at a time)."""
    if not labels:
        return read_parquet(store_path(run_dir) / LEDGER_NAME, columns)
    with (store_path(run_dir) / LEDGER_NAME).open() as f:
        return pq.read_table(f, columns=columns, read_dictionary=labels).unify_dictionaries()
