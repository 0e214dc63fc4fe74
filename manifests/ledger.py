"""The ledger: one row per unit of work with its terminal state.

accepted (the shard that holds it), rejected (stage, reason code, scores, thresholds) or failed (stage,
error class, message). Units are source samples until the instruct stage fans them out into pairs; a
source sample therefore appears once if it ended before fan-out, else once per candidate pair.
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from manifests.commit import atomic_write_parquet
from manifests.schema import ACCEPTED, LIVE, ROW_STAGES

LEDGER_COLUMNS = ("unit_id", "sample_id", "pair_id", "status", "stage", "reason", "message", "warnings",
                  "source_uri", "task", "op", "editor", "instruction_en", "scores", "thresholds",
                  *(f"t_{stage}" for stage in ROW_STAGES))
LEDGER_NAME = "ledger.parquet"
PLAN_KEY = b"x2edit_plan"


def build_ledger(rows: pa.Table, shard_of: dict[str, str]) -> pa.Table:
    """Ledger rows from the last stage's rows; live rows are accepted into the shard named in shard_of."""
    table = rows.select(list(LEDGER_COLUMNS))
    status = table.column("status").to_pylist()
    units = table.column("unit_id").to_pylist()
    missing = [u for u, s in zip(units, status) if s == LIVE and u not in shard_of]
    if missing:
        raise ValueError(f"{len(missing)} live units have no shard (first: {missing[0]!r})")
    final = [ACCEPTED if s == LIVE else s for s in status]
    shards = [shard_of.get(u) if s == LIVE else None for u, s in zip(units, status)]
    table = table.set_column(table.schema.get_field_index("status"), "status", pa.array(final, pa.string()))
    return table.append_column("shard", pa.array(shards, pa.string()))


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
