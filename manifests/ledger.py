"""The ledger: one row per unit of work with its terminal state.

accepted (the shard that holds it), rejected (stage, reason code, scores, thresholds) or failed (stage,
error class, message). Units are source samples until the instruct stage fans them out into pairs; a
source sample therefore appears once if it ended before fan-out, else once per candidate pair.
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from manifests.commit import atomic_write_parquet
from manifests.schema import ACCEPTED, LIVE, ROW_STAGES

LEDGER_COLUMNS = ("unit_id", "sample_id", "pair_id", "status", "stage", "reason", "message", "warnings",
                  "source_uri", "task", "op", "editor", "instruction_en", "scores", "thresholds",
                  *(f"t_{stage}" for stage in ROW_STAGES))
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


def write_ledger(run_dir: Path, ledger: pa.Table, plan: dict[str, dict]) -> Path:
    """`plan`: the stages' completion records (manifests.fragments). Kept in the file's metadata, so a corpus
    copied without its stage outputs can still be checked against the units it was planned with."""
    path = Path(run_dir) / LEDGER_NAME
    atomic_write_parquet(path, ledger.replace_schema_metadata({PLAN_KEY: json.dumps(plan, sort_keys=True)}))
    return path


def ledger_plan(path: Path) -> dict[str, dict]:
    """The completion records a ledger was written against ({} for a ledger written before they existed)."""
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta[PLAN_KEY]) if PLAN_KEY in meta else {}


def read_ledger(run_dir: Path) -> pa.Table:
    return pq.read_table(Path(run_dir) / LEDGER_NAME)
