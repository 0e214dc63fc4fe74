"""`x2edit-shards show`: one pair or unit — its record and images, checked against its manifest checksums."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from manifests.inspect import Run, RunError, ended_rows, read_members
from manifests.ledger import LEDGER_NAME
from manifests.schema import ACCEPTED
from manifests.shards import decode_record


def _ledger_row(run: Run, key: str) -> dict | None:
    if not run.ledger_path:
        return None
    rows = pq.read_table(run.ledger_path.open(), filters=(pc.field("pair_id") == key) | (pc.field("unit_id") == key))
    return rows.to_pylist()[0] if rows.num_rows else None


def _manifest_row(run: Run, key: str, shard: str | None) -> dict | None:
    paths = [run.shards_dir / f"{shard}.parquet"] if shard else run.manifests()
    for path in paths:
        try:
            rows = pq.read_table(path.open(), filters=pc.field("pair_id") == key)
        except FileNotFoundError:
            raise RunError(f"the ledger puts {key!r} in shard {shard}, but {path} does not exist") from None
        if rows.num_rows:
            return rows.to_pylist()[0]
    return None


def show_pair(run: Run, key: str, out: Path) -> dict:
    """The record of one pair (or ended unit) and its images written into `out`; returns the record."""
    ledger = _ledger_row(run, key)
    accepted = ledger is None or ledger["status"] == ACCEPTED
    manifest = _manifest_row(run, key, ledger["shard"] if ledger else None) if accepted else None
    if ledger is None and manifest is None:
        raise RunError(f"no pair or unit {key!r} in {run.root} (searched "
                       f"{LEDGER_NAME + ' and ' if run.ledger_path else ''}{len(run.manifests())} manifests); "
                       "list ids with `x2edit-shards sample RUN`")
    if accepted and manifest is None:
        raise RunError(f"the ledger accepts {key!r} into shard {ledger['shard']}, but its manifest has no such pair")
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    if not accepted:
        return _ended_record(run, ledger, out)
    members = read_members(run, manifest["shard"], {key}).get(key, {})
    expected = dict(zip(manifest["members"], manifest["member_sha256"]))
    missing = sorted(set(expected) - set(members))
    if missing:
        raise RunError(f"{run.tar(manifest['shard'])}: member {missing[0]} of pair {key!r} is listed in "
                       f"{manifest['shard']}.parquet but missing from the tar; run `x2edit-shards validate`")
    for name, data in members.items():
        if hashlib.sha256(data).hexdigest() != expected.get(name):
            raise RunError(f"{run.tar(manifest['shard'])}: member {name} does not match its manifest checksum; "
                           "run `x2edit-shards validate`")
        (out / name).write_bytes(data)
    record = decode_record(json.loads(members[f"{key}.json"]))
    return {**record, "decision": ACCEPTED, "shard": manifest["shard"], "files": [str(out / n) for n in members]}


def _ended_record(run: Run, ledger: dict, out: Path) -> dict:
    unit = ledger["unit_id"]
    extra = ended_rows(run, [unit], ["instruction_zh", "params", "subject", "provenance", "source_meta", "thumb"])
    extra = extra.get(unit, {})
    thumb = extra.pop("thumb", None)
    record = decode_record({**ledger, **{k: v for k, v in extra.items() if k != "unit_id"},
                            "decision": ledger["status"]})
    record["files"] = []
    if thumb is not None:  # the pipeline keeps no full-size images of units it ended
        (out / f"{unit}.thumb.jpg").write_bytes(thumb)
        record["files"] = [str(out / f"{unit}.thumb.jpg")]
    return record
