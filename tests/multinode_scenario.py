"""The multi-node scenario of tests/test_multinode.py, in a process of its own (it starts its own Ray cluster, which
the test process, connected to the session cluster, cannot): three nodes on loopback with `ray.cluster_utils.
Cluster`, the row stages pinned to the two worker nodes by a custom resource.

    python tests/multinode_scenario.py WORK_DIR [LOSSY_RUN_DIR]   → one JSON line on stdout

1. A driver whose run dir no node can see (a tmpfs mounted in the driver's own mount namespace) is refused.
2. An uninterrupted fused run: the reference corpus.
3. The same run into LOSSY_RUN_DIR (default WORK_DIR/lossy; the test gives an s3:// prefix: the nodes then write
   to the object store), a worker node removed once the first fragments are committed: Ray restarts the stage
   actors on the other worker node; the run finishes, or a rerun on the same run dir does.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback only (environment.md), before Ray is imported
os.environ["RAY_AUTH_MODE"] = "disabled"

import yaml  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from manifests.storage import StorePath, store_path  # noqa: E402
from pipeline.run import run  # noqa: E402
from tests.corpus import check_run, pairs  # noqa: E402

PREFIX = "small"


def recipe(work: Path) -> str:
    """The small test recipe with its row stages needing the `worker` resource only the worker nodes have."""
    body = yaml.safe_load((ROOT / "tests" / "recipes" / "small-cpu.yaml").read_text())
    for stage in ("instruct", "edit", "score"):
        body["resources"][stage]["resources"] = {"worker": 0.5}
    path = work / "multinode.yaml"
    path.write_text(yaml.safe_dump(body))
    return str(path)


def refused_from_private_mount(address: str, recipe_path: str, work: Path) -> dict:
    private = work / "private"
    private.mkdir()
    script = (f"mount -t tmpfs tmpfs {private} && exec {sys.executable} -m pipeline run --recipe {recipe_path} "
              f"--run-dir {private}/run --address {address}")
    done = subprocess.run(["unshare", "--mount", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    return {"rc": done.returncode, "stderr": done.stderr[-2000:]}


def remove_when_committed(cluster: Cluster, node, watched: StorePath, removed: dict) -> None:
    """Remove `node` once the fused run has committed its first score-stage fragments (mid-run)."""
    deadline = time.time() + 300
    while time.time() < deadline and len(watched.glob("frag-*.parquet")) < 2:
        time.sleep(0.2)
    removed["fragments_before"] = len(watched.glob("frag-*.parquet"))
    cluster.remove_node(node, allow_graceful=False)
    removed["at"] = time.time()


def main(work: Path, lossy: str) -> dict:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False})
    doomed = cluster.add_node(num_cpus=2, resources={"worker": 2}, node_ip_address="127.0.0.1")
    cluster.add_node(num_cpus=2, resources={"worker": 2}, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    result: dict = {}
    try:
        recipe_path = recipe(work)
        result["refused"] = refused_from_private_mount(cluster.address, recipe_path, work)
        run(recipe_path, str(work / "reference"), address=cluster.address)
        result["reference"] = check_run(work / "reference", PREFIX)

        removed: dict = {}
        watcher = threading.Thread(target=remove_when_committed,
                                   args=(cluster, doomed, store_path(lossy) / "stages" / "score", removed))
        watcher.start()
        try:
            run(recipe_path, lossy, address=cluster.address)
            result["finished_despite_loss"] = True
            result["run_ended_at"] = time.time()
        except Exception as e:  # the loss may end the run; the rerun below must then finish the corpus
            result["finished_despite_loss"] = False
            result["error"] = f"{type(e).__name__}: {e}"[:500]
        watcher.join()
        if not result["finished_despite_loss"]:
            run(recipe_path, lossy, address=cluster.address)
        result["removed"] = removed
        result["lossy"] = check_run(store_path(lossy), PREFIX)
        result["same_corpus"] = pairs(store_path(lossy), PREFIX) == pairs(work / "reference", PREFIX)
        result["pairs"] = len(pairs(work / "reference", PREFIX))
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()
    return result


if __name__ == "__main__":
    work_dir = Path(sys.argv[1])
    print(json.dumps(main(work_dir, sys.argv[2] if len(sys.argv) > 2 else str(work_dir / "lossy"))), flush=True)
