"""A run dir in an object store: the pipeline writes it through the S3 protocol to a real S3-compatible server on
127.0.0.1 (moto), a driver killed mid-run resumes, per-stage jobs hand over through the bucket, and either way
the corpus is the uninterrupted local run's, byte for byte."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from manifests.storage import store_path
from pipeline.run import run
from tests.corpus import check_run, pairs
from tests.s3_server import new_bucket

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "x2edit"  # the default recipe's


def _same_corpus(run_dir: str, default_run: Path) -> None:
    check_run(store_path(run_dir), PREFIX)
    assert pairs(store_path(run_dir), PREFIX) == pairs(default_run, PREFIX)
    shards = store_path(run_dir) / "shards"
    for tar in sorted((default_run / "shards").glob("*.tar")):  # deterministic tars, whatever the store
        assert (shards / tar.name).read_bytes() == tar.read_bytes(), tar.name


def test_a_run_in_an_object_store_killed_and_resumed_equals_the_local_run(default_run, ray_cluster, s3_server):
    run_dir = f"s3://{new_bucket()}/corpus/run"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--recipe", "default-cpu", "--run-dir",
                             run_dir, "--address", ray_cluster["address"]],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    score = store_path(run_dir) / "stages" / "score"
    deadline = time.time() + 240
    while time.time() < deadline and not score.glob("frag-*.parquet"):
        time.sleep(0.1)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert score.glob("frag-*.parquet") and not (store_path(run_dir) / "ledger.parquet").exists()
    time.sleep(2)  # let Ray reap the dead driver's actors
    run("default-cpu", run_dir, address=ray_cluster["address"])
    _same_corpus(run_dir, default_run)


def test_per_stage_jobs_hand_over_through_the_bucket(default_run, ray_cluster, s3_server):
    """Each stage reads the previous stage's fragments from the bucket and writes its own there."""
    run_dir = f"s3://{new_bucket()}/run"
    for stage in ("source", "instruct", "edit", "score", "pack"):
        run("default-cpu", run_dir, stage=stage, address=ray_cluster["address"])
        assert (store_path(run_dir) / "stages" / stage / "COMPLETE.json").exists() or stage == "pack"
    _same_corpus(run_dir, default_run)
