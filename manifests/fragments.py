"""Stage output fragments: the exactly-once unit between stages.

Each stage (or the fused chain) writes what it produced as Parquet fragments, one per output block, through
the commit protocol. Fragment names hash the unit ids they hold, so rewriting the same block is idempotent.

Resume. A unit is done in a stage when all the rows it turns into are committed:
- a row that is already a pair (after the instruct stage) is done when its unit_id is present;
- a source sample is done when every one of its `fanout` rows is present (it may have been split across
  fragments, and the process may have died between two of them).
A rerun recomputes the samples that are not done. Their rows that were committed before the kill come back
identical (pair ids are deterministic), and readers keep the first copy of each unit id.

Completion. A stage that has finished every unit of the plan writes `COMPLETE.json` (counts and digests of
its units and source samples) after its last fragment; a per-stage job refuses to start before its
predecessor's record exists, so no unit can silently go missing between stages and the ledger.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from manifests.commit import TMP_MARKER, atomic_write_bytes, atomic_write_parquet
from manifests.schema import stable_hash


def write_fragment(directory: Path, table: pa.Table) -> Path:
    units = sorted(table.column("unit_id").to_pylist())
    path = Path(directory) / f"frag-{stable_hash(*units, n=24)}.parquet"
    atomic_write_parquet(path, table)
    return path


def list_fragments(directory: Path) -> list[Path]:
    directory = Path(directory)
    if not directory.exists():
        return []
    return sorted(p for p in directory.glob("frag-*.parquet") if TMP_MARKER not in p.name)


def read_units(directory: Path, columns: list[str] | None = None) -> pa.Table:
    """All committed rows of a stage, one per unit id (first copy wins, in fragment-name order)."""
    tables = []
    for path in list_fragments(directory):
        table = pq.read_table(path, columns=columns)
        tables.append(table.append_column("_fragment", pa.array([path.name] * table.num_rows, pa.string())))
    if not tables:
        return pa.table({"unit_id": pa.array([], pa.string())})
    table = pa.concat_tables(tables)
    first = _first_occurrence(table.column("unit_id").to_pylist())
    return table.take(pa.array(first, pa.int64()))


def _first_occurrence(ids: list[str]) -> list[int]:
    seen: set[str] = set()
    keep = []
    for i, unit in enumerate(ids):
        if unit not in seen:
            seen.add(unit)
            keep.append(i)
    return keep


def done_ids(directory: Path) -> set[str]:
    """Unit ids and sample ids whose work in this stage is complete."""
    table = read_units(directory, columns=["unit_id", "sample_id", "fanout"])
    if table.num_rows == 0:
        return set()
    units = table.column("unit_id").to_pylist()
    samples = table.column("sample_id").to_pylist()
    fanouts = table.column("fanout").to_pylist()
    have = Counter(samples)
    expected = dict(zip(samples, fanouts))
    complete = {s for s, n in have.items() if n >= (expected[s] or 1)}
    return set(units) | complete



# ------------------------------------------------------------------------------------------ completion

COMPLETE_NAME = "COMPLETE.json"


def unit_digest(ids: list[str]) -> str:
    """Order-free digest of a set of ids: two runs planned the same units exactly when these agree."""
    return stable_hash(*sorted(set(ids)), n=32)


def plan_record(table: pa.Table) -> dict:
    """Counts and digests of the units and source samples in a table (needs unit_id, sample_id)."""
    units, samples = table.column("unit_id").to_pylist(), table.column("sample_id").to_pylist()
    return {"units": len(set(units)), "units_sha": unit_digest(units),
            "samples": len(set(samples)), "samples_sha": unit_digest(samples)}


def mark_complete(directory: Path, record: dict) -> None:
    """Record that a stage has finished every unit of the plan. Written last, through the commit protocol,
    so its presence means the stage's fragments hold the whole plan; the next stage starts only then."""
    atomic_write_bytes(Path(directory) / COMPLETE_NAME, json.dumps(record, indent=1, sort_keys=True).encode())


def read_completion(directory: Path) -> dict | None:
    path = Path(directory) / COMPLETE_NAME
    return json.loads(path.read_text()) if path.exists() else None
