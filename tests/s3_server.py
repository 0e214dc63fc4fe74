"""An S3-compatible server on 127.0.0.1 for the object-storage tests: moto's server mode, a real HTTP server
speaking the S3 protocol (signed requests, multipart uploads, listings), started once per test session.

Its endpoint and test credentials are put in the environment when conftest is imported, before the session's
Ray cluster starts, so every Ray worker reads the same store the way a cluster node reads its own
configuration (environment variables, never a recipe)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

with socket.socket() as _s:
    _s.bind(("127.0.0.1", 0))
    PORT = _s.getsockname()[1]
ENV = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{PORT}", "AWS_ACCESS_KEY_ID": "x2edit-test",
       "AWS_SECRET_ACCESS_KEY": "x2edit-test", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def set_environment() -> None:
    for key, value in ENV.items():
        os.environ.setdefault(key, value)


@pytest.fixture(scope="session")
def s3_server():
    """The server's endpoint; `new_bucket()` gives each test a bucket of its own."""
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(PORT)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", PORT), timeout=1).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto server did not start on port {PORT} (exit {server.poll()})")
            time.sleep(0.2)
    yield ENV["AWS_ENDPOINT_URL"]
    server.kill()
    server.wait()


def new_bucket() -> str:
    import boto3

    name = f"x2t-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket=name)
    return name
