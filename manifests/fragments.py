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

import hashlib
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from manifests.commit import TMP_MARKER, atomic_write_bytes
from manifests.schema import HEAVY_COLUMNS, ROW_SCHEMA, stable_hash
from manifests.storage import StorePath, read_parquet, store_path


# Fragments are read a few hundred at a time into one chunk: a chunk per fragment costs more than its rows.
COMBINE_FRAGMENTS = 256
ROW_GROUP_ROWS = 64  # the pack reads a fragment by row groups (stages/pack.py): small ones, little waste
# min/max of image bytes help no reader, and would fill the footer every pack job reads (small images' fit)
STATISTICS = [c for c in ROW_SCHEMA.names if c not in (*HEAVY_COLUMNS, "thumb")]


def fragment_path(directory: Path | StorePath, unit_ids: list[str]) -> StorePath:
    return store_path(directory) / f"frag-{stable_hash(*sorted(unit_ids), n=24)}.parquet"


def fragment_bytes(table: pa.Table) -> bytes:
    # No dictionary pages: most columns are unique per row (ids, texts, images) and zstd finds what repeats in
    # the others; writing is ~30 % faster and the files a few per cent smaller (bench/README.md, "millions").
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=ROW_GROUP_ROWS, use_dictionary=False,
                   write_statistics=[c for c in STATISTICS if c in table.column_names])
    return buf.getvalue()


def write_fragment(directory: Path | StorePath, table: pa.Table) -> StorePath:
    path = fragment_path(directory, table.column("unit_id").to_pylist())
    atomic_write_bytes(path, fragment_bytes(table))
    return path


def list_fragments(directory: Path | StorePath) -> list[StorePath]:
    return [p for p in store_path(directory).glob("frag-*.parquet") if TMP_MARKER not in p.name]


def read_units(directory: Path | StorePath, columns: list[str] | None = None) -> pa.Table:
    """All committed rows of a stage, one per unit id (first copy wins, in fragment-name order), with where
    each lies: `_fragment` (file name, dictionary-encoded) and `_row` (its row in that file)."""
    paths = list_fragments(directory)
    if not paths:
        return pa.table({"unit_id": pa.array([], pa.string())})
    parts, pending, sizes = [], [], []
    for path in paths:
        pending.append(read_parquet(path, columns))
        sizes.append(pending[-1].num_rows)
        if len(pending) == COMBINE_FRAGMENTS or path == paths[-1]:
            parts.append(pa.concat_tables(pending).combine_chunks())
            pending = []
    table = pa.concat_tables(parts)
    fragment = pa.DictionaryArray.from_arrays(pa.array(np.repeat(np.arange(len(paths), dtype=np.int32), sizes)),
                                              pa.array([p.name for p in paths], pa.string()))
    row = np.concatenate([np.arange(n, dtype=np.int32) for n in sizes])
    table = table.append_column("_fragment", fragment).append_column("_row", pa.array(row))
    first = first_occurrences(table.column("unit_id"))
    return table if first is None else table.take(first)


def first_occurrences(ids: pa.ChunkedArray) -> pa.Array | None:
    """Indices of the first row of each distinct id, in row order; None when no id repeats."""
    if pc.count_distinct(ids).as_py() == len(ids):
        return None
    first = pa.table({"id": ids, "i": np.arange(len(ids))}).group_by("id").aggregate([("i", "min")])
    return pa.array(np.sort(first.column("i_min").to_numpy()))


def done_ids(directory: Path | StorePath) -> set[str]:
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
SEP, DIGEST_SLICE = "\x1f", 65536  # schema.stable_hash's separator


def unit_digest(ids: pa.Array | pa.ChunkedArray) -> str:
    """Order-free digest of a set of ids: two runs planned the same units exactly when these agree. The
    stable_hash of the sorted distinct ids, hashed a slice at a time (a million ids stay one Arrow column)."""
    ids = pc.unique(pa.chunked_array([ids]) if isinstance(ids, pa.Array) else ids)
    ids = ids.take(pc.array_sort_indices(ids))
    digest = hashlib.sha1()
    for start in range(0, len(ids), DIGEST_SLICE):
        digest.update((SEP * bool(start) + SEP.join(ids.slice(start, DIGEST_SLICE).to_pylist())).encode())
    return digest.hexdigest()[:32]


def plan_record(table: pa.Table) -> dict:
    """Counts and digests of the units and source samples in a table (needs unit_id, sample_id)."""
    units, samples = table.column("unit_id"), table.column("sample_id")
    return {"units": pc.count_distinct(units).as_py(), "units_sha": unit_digest(units),
            "samples": pc.count_distinct(samples).as_py(), "samples_sha": unit_digest(samples)}


def mark_complete(directory: Path | StorePath, record: dict) -> None:
    """Record that a stage has finished every unit of the plan. Written last, through the commit protocol,
    so its presence means the stage's fragments hold the whole plan; the next stage starts only then."""
    atomic_write_bytes(store_path(directory) / COMPLETE_NAME, json.dumps(record, indent=1, sort_keys=True).encode())


def read_completion(directory: Path | StorePath) -> dict | None:
    path = store_path(directory) / COMPLETE_NAME
    return json.loads(path.read_text()) if path.exists() else None
