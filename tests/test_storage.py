"""The storage layer (manifests/storage.py, manifests/commit.py) on a local folder and on a real S3-compatible server
on 127.0.0.1: the same operations, the same answers; commits that a failing writer leaves no trace of."""
from __future__ import annotations

import os
import pickle

import pyarrow as pa
import pytest

from manifests.commit import atomic_write_bytes, atomic_write_parquet, atomic_writer, discard_uncommitted
from manifests.shards import committed_shards, discard_orphan_tars, write_shard
from manifests.storage import read_parquet, store_path
from tests.s3_server import new_bucket


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return store_path(tmp_path / "run")
    request.getfixturevalue("s3_server")
    return store_path(f"s3://{new_bucket()}/some/run")


def test_files_are_written_listed_read_and_deleted_alike(root):
    assert not root.exists() and root.iterdir() == []
    atomic_write_bytes(root / "b.json", b"{}")
    atomic_write_bytes(root / "a" / "x.bin", b"xyz")
    atomic_write_parquet(root / "t.parquet", pa.table({"n": [1, 2, 3]}))
    assert [p.name for p in root.iterdir()] == ["a", "b.json", "t.parquet"]
    assert [p.name for p in root.glob("*.json")] == ["b.json"] and (root / "a").is_dir()
    assert (root / "a" / "x.bin").read_bytes() == b"xyz" and (root / "a" / "x.bin").size() == 3
    assert read_parquet(root / "t.parquet", ["n"], filters=[("n", ">", 1)])["n"].to_pylist() == [2, 3]
    (root / "b.json").unlink()
    (root / "b.json").unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError):
        (root / "b.json").read_bytes()
    assert not (root / "b.json").exists() and discard_uncommitted(root) == []


def test_a_writer_that_fails_midway_leaves_nothing_under_the_final_name(root):
    atomic_write_bytes(root / "ledger.parquet", b"old")
    with pytest.raises(RuntimeError, match="midway"):
        with atomic_writer(root / "ledger.parquet") as f:
            f.write(b"half of the new")
            raise RuntimeError("the writer failed midway")
    assert (root / "ledger.parquet").read_bytes() == b"old"
    assert [p.name for p in root.iterdir()] == ["ledger.parquet"]  # no temporary file either
    with atomic_writer(root / "ledger.parquet") as f:
        f.write(b"new")
    assert (root / "ledger.parquet").read_bytes() == b"new"


def test_tars_without_their_manifest_are_discarded_and_committed_shards_kept(root):
    shards = root / "shards"
    manifest = pa.table({"pair_id": ["p1"]})
    write_shard(shards, "c-000000", [("p1.json", b"{}")], manifest, {"plan_hash": "h"})
    atomic_write_bytes(shards / "c-000001.tar", b"a tar whose manifest a kill prevented")
    assert [p.name for p in discard_orphan_tars(shards, "c")] == ["c-000001.tar"]
    assert list(committed_shards(shards, "c")) == ["c-000000"]
    assert [p.name for p in shards.iterdir()] == ["c-000000.parquet", "c-000000.tar"]


def test_a_path_travels_to_a_worker_as_its_url_without_credentials(root):
    sent = pickle.dumps(root / "stages")
    assert os.environ["AWS_SECRET_ACCESS_KEY"].encode() not in sent
    assert pickle.loads(sent) == root / "stages"


def test_a_remote_path_cannot_be_opened_as_a_local_file(s3_server):
    bucket = new_bucket()
    remote = store_path(f"s3://{bucket}/run/")
    with pytest.raises(TypeError, match="object store"):
        open(remote / "ledger.parquet", "rb")
    assert str(remote / "ledger.parquet") == f"s3://{bucket}/run/ledger.parquet" and remote.bucket().name == bucket
