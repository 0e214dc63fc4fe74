"""One Ray cluster per test session, started the way users start one (`ray start --head`), so the same
cluster serves in-process runs, subprocess drivers that get killed, and `ray job submit`."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
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


@pytest.fixture(scope="session")
def ray_cluster():
    """Address and dashboard URL of a local head node; the test process is connected to it."""
    port, dash = _free_port(), _free_port()
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--node-ip-address=127.0.0.1",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
                    "--disable-usage-stats"], check=True, cwd=ROOT, capture_output=True,
                   env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    address = f"127.0.0.1:{port}"
    from pipeline.cluster import connect

    connect(address)
    yield {"address": address, "dashboard": f"http://127.0.0.1:{dash}"}
    import ray

    ray.shutdown()
    subprocess.run([RAY, "stop", "--force"], check=False, capture_output=True)


@pytest.fixture
def run_dir(tmp_path):
    path = tmp_path / "run"
    yield path
    shutil.rmtree(path, ignore_errors=True)
