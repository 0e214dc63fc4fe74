"""One Ray cluster per test session, started the way users start one (`ray start --head`), so the same
cluster serves in-process runs, subprocess drivers that get killed, and `ray job submit`."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

os.environ["RAY_AUTH_MODE"] = "disabled"  # see environment.md: a token file breaks later job submits
os.environ["HF_HUB_OFFLINE"] = "1"  # an accidental download fails at once instead of hanging
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
# The test cluster, its drivers and jobs listen on loopback only (see pipeline/cluster.py); set before any
# Ray import, since Ray reads it into a constant.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

from tests.s3_server import s3_server, set_environment  # noqa: E402  (the fixture, for every test module)

set_environment()  # before the cluster starts: its workers read the test S3 server like a node reads its store

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytest_collection_modifyitems(items):
    """A test on the session's Ray cluster is slow (the cluster alone takes seconds to start): marked here, so
    `make test-fast` (-m "not slow") never starts one, however the test reaches the fixture."""
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


def cluster_pids(marker: str) -> set[int]:
    """This test cluster's processes: every one of them, agents included, inherits the marker variable from
    `ray start`'s environment."""
    needle, pids = marker.encode(), set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "environ").read_bytes():
                pids.add(int(proc.name))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # the process ended while we looked
    return pids


def _stop_cluster(marker: str) -> None:
    """Kill this cluster's processes only (`ray stop` would kill every Ray cluster on the machine)."""
    for pid in cluster_pids(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue


@pytest.fixture(scope="session")
def ray_cluster():
    """Address, dashboard URL and process marker of a local head node; the test process is connected to it."""
    marker = f"X2EDIT_TEST_CLUSTER=x2t-{os.getpid()}-{time.time_ns()}"
    ports = [_free_port() for _ in range(4)]
    temp_dir = tempfile.mkdtemp(prefix="x2t-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           marker.split("=")[0]: marker.split("=")[1]}
    # Every port explicit, so a cluster of an earlier session that is still shutting down cannot collide.
    subprocess.run([RAY, "start", "--head", f"--port={ports[0]}", "--num-cpus=2", "--node-ip-address=127.0.0.1",
                    f"--temp-dir={temp_dir}", "--dashboard-host=127.0.0.1", f"--dashboard-port={ports[1]}",
                    f"--dashboard-agent-listen-port={ports[2]}", f"--ray-client-server-port={ports[3]}",
                    "--include-dashboard=true", "--disable-usage-stats"],
                   check=True, cwd=ROOT, capture_output=True, env=env)
    address = f"127.0.0.1:{ports[0]}"
    from pipeline.cluster import connect

    connect(address)
    yield {"address": address, "dashboard": f"http://127.0.0.1:{ports[1]}", "marker": marker.split("=")[1]}
    import ray

    ray.shutdown()
    _stop_cluster(marker.split("=")[1])
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def default_run(ray_cluster, tmp_path_factory):
    """One run of the shipped default recipe, shared by the tests that read or re-filter its corpus."""
    from pipeline.run import run
    from tests.corpus import check_run

    run_dir = tmp_path_factory.mktemp("default") / "run"
    run("default-cpu", str(run_dir), address=ray_cluster["address"])
    check_run(run_dir, "x2edit")
    return run_dir


@pytest.fixture
def run_dir(tmp_path):
    path = tmp_path / "run"
    yield path
    shutil.rmtree(path, ignore_errors=True)
