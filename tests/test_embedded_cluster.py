"""The embedded cluster: always a fresh one, whatever another cluster left behind, listening on loopback only;
and the test session's own `ray start` cluster is held to the same rule."""
from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, cluster_pids

RECIPE = str(ROOT / "tests" / "recipes" / "small-cpu.yaml")
pytestmark = pytest.mark.slow


def _listening(pids: set[int]) -> set[tuple[str, int, str]]:
    """(ip, port, process name) of every listening TCP socket of these processes."""
    found = set()
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            try:
                name = psutil.Process(conn.pid).name()
            except psutil.NoSuchProcess:
                continue
            found.add((conn.laddr.ip, conn.laddr.port, name))
    return found


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return address.is_loopback or getattr(address, "ipv4_mapped", None) is not None and address.ipv4_mapped.is_loopback


def test_embedded_run_ignores_a_dead_clusters_address_file_and_listens_on_loopback_only(tmp_path):
    # What a cluster killed without `ray stop` leaves: its address file, pointing at nothing.
    ray_tmp = Path(tempfile.mkdtemp(prefix="x2e-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env["RAY_TMPDIR"] = str(ray_tmp)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--recipe", RECIPE, "--run-dir",
                             str(tmp_path / "run")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    sockets: set[tuple[str, int, str]] = set()
    deadline = time.time() + 300
    try:
        while proc.poll() is None and time.time() < deadline:
            try:
                tree = {proc.pid} | {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
            except psutil.NoSuchProcess:
                break
            sockets |= _listening(tree)
            time.sleep(0.25)
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate()[0]
    assert proc.returncode == 0, out[-3000:]
    assert "[x2edit] Ray: embedded local cluster at 127.0.0.1:" in out and "Failed to connect to GCS" not in out
    assert (tmp_path / "run" / "ledger.parquet").exists()
    names = {name for _, _, name in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets  # the sampling saw the cluster
    assert [s for s in sockets if not _loopback(s[0])] == []


def test_the_test_cluster_listens_on_loopback_only(ray_cluster):
    sockets = _listening(cluster_pids(ray_cluster["marker"]))
    assert {"gcs_server", "raylet"} <= {name for _, _, name in sockets}, sockets
    assert [s for s in sockets if not _loopback(s[0])] == []
