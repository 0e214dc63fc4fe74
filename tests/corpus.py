"""Checks shared by the end-to-end tests: what every finished run dir must satisfy."""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import webdataset as wds

from manifests.fragments import plan_record, read_completion
from manifests.images import encode_jpeg
from manifests.ledger import read_ledger
from manifests.schema import LIVE, empty_row
from manifests.shards import decode_record, iter_shard, read_manifests
from manifests.storage import StorePath, parquet_schema, read_parquet, store_path


def source_row(image: np.ndarray, position: int) -> dict:
    """A live row as the source stage hands it on (sample s<position>), for tests of the later stages."""
    row = empty_row()
    row.update(unit_id=f"s{position}", sample_id=f"s{position}", fanout=1, status=LIVE, position=position,
               src=encode_jpeg(image), provenance=None)
    return row


def pairs(run_dir: Path | StorePath, prefix: str) -> dict[str, tuple]:
    """pair_id → (task, member checksums) from the manifests."""
    table = read_manifests(store_path(run_dir) / "shards", prefix)
    return {p: (t, tuple(s)) for p, t, s in zip(table.column("pair_id").to_pylist(), table.column("task").to_pylist(),
                                                 table.column("member_sha256").to_pylist())}


def check_run(run_dir: Path | StorePath, prefix: str) -> dict:
    """Every invariant of a finished run, local or in an object store; returns the ledger's status counts."""
    run_dir = store_path(run_dir)
    ledger = read_ledger(run_dir)
    units = ledger.column("unit_id").to_pylist()
    assert len(units) == len(set(units)), "a unit has two terminal states"
    status = ledger.column("status").to_pylist()
    assert set(status) <= {"accepted", "rejected", "failed"}
    for row in ledger.to_pylist():
        if row["status"] != "accepted":
            assert row["stage"] and row["reason"], f"ended without a reason: {row['unit_id']}"
    accepted = {u for u, s in zip(units, status) if s == "accepted"}
    plan = read_completion(run_dir / "stages" / "score")
    assert plan is not None, "the score stage recorded no completion"
    have = plan_record(ledger)
    assert have == {k: plan[k] for k in have}, "the ledger does not hold exactly the planned units"

    manifest = read_manifests(run_dir / "shards", prefix)
    keys = manifest.column("pair_id").to_pylist()
    assert len(keys) == len(set(keys)), "duplicate keys across shards"
    assert set(keys) == accepted, "ledger's accepted units differ from the corpus"
    shard_files = (run_dir / "shards").glob(f"{prefix}-*.tar")
    for tar in shard_files:
        rows = read_parquet(tar.with_suffix(".parquet")).to_pylist()
        summary = json.loads(parquet_schema(tar.with_suffix(".parquet")).metadata[b"x2edit"])
        assert summary["sha256"] == hashlib.sha256(tar.read_bytes()).hexdigest()
        samples = list(iter_shard(tar))
        assert [s["__key__"] for s in samples] == [r["pair_id"] for r in rows]
        for sample, row in zip(samples, rows):
            files = {f"{sample['__key__']}.{k}": v for k, v in sample.items() if k != "__key__"}
            assert sorted(files) == sorted(row["members"])
            assert sorted(sample) == ["__key__", "edited.jpg", "json", "mask.png", "src.jpg"]  # one member set
            for name, digest in zip(row["members"], row["member_sha256"]):
                assert hashlib.sha256(files[name]).hexdigest() == digest
            record = decode_record(json.loads(sample["json"]))
            assert record["instruction_en"] and record["instruction_zh"] and "." not in sample["__key__"]
            assert record["provenance"]["edit"]["worker"] and record["provenance"]["recipe_hash"]
    if run_dir.is_local:  # the webdataset library reads the corpus unchanged (object stores: test_s3_readers)
        n = sum(1 for _ in wds.WebDataset([str(p) for p in shard_files], shardshuffle=False)) if shard_files else 0
        assert n == len(keys)
    return dict(Counter(status))
