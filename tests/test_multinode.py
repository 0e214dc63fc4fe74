"""Multi-node Ray on this one machine (tests/multinode_scenario.py, in its own process): a worker node lost in the
middle of a run whose run dir is in an object store (an S3 server on loopback) changes nothing in the corpus, and
a run dir the nodes cannot see is refused before any work."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from tests.s3_server import new_bucket

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_losing_a_worker_node_mid_run_gives_the_uninterrupted_corpus(tmp_path, s3_server):
    lossy = f"s3://{new_bucket()}/lossy"  # the reference run's dir is local: the corpus must not depend on the store
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "multinode_scenario.py"), str(tmp_path), lossy],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])

    assert result["pairs"] > 20 and result["lossy"] == result["reference"] and result["same_corpus"]
    assert result["removed"]["fragments_before"] >= 2  # removed mid-run, not before the run or after it
    if result["finished_despite_loss"]:
        assert result["removed"]["at"] < result["run_ended_at"]

    refused = result["refused"]
    if shutil.which("unshare") is None or "Operation not permitted" in refused["stderr"]:
        warnings.warn(f"the refusal of a run dir the nodes cannot see was not checked: no private mount namespace "
                      f"here ({refused['stderr'][-300:]})")
        return
    assert refused["rc"] == 2 and "is not visible from 3 of the cluster's 3 nodes" in refused["stderr"]
