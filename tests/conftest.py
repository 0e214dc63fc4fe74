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
from pathlib import Path

import pytest

os.environ["RAY_AUTH_MODE"] = "disabled"  # see environment.md: a token file breaks later job submits
os.environ["HF_HUB_OFFLINE"] = "1"  # an accidental download fails at once instead of hanging
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_cluster(temp_dir: str) -> None:
    """Kill this cluster's processes only (`ray stop` would kill every Ray cluster on the machine)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if temp_dir.encode() in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # the process ended while we looked


@pytest.fixture(scope="session")
def ray_cluster():
    """Address and dashboard URL of a local head node; the test process is connected to it."""
    port, dash = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="x2t-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--node-ip-address=127.0.0.1",
                    f"--temp-dir={temp_dir}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
                    "--disable-usage-stats"], check=True, cwd=ROOT, capture_output=True,
                   env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    address = f"127.0.0.1:{port}"
    from pipeline.cluster import connect

    connect(address)
    yield {"address": address, "dashboard": f"http://127.0.0.1:{dash}"}
    import ray

    ray.shutdown()
    _stop_cluster(temp_dir)
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def run_dir(tmp_path):
    path = tmp_path / "run"
    yield path
    shutil.rmtree(path, ignore_errors=True)
