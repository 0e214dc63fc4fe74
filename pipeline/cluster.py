"""Connecting to Ray: a fresh embedded cluster on loopback by default, or the cluster named by `--address`
/ `RAY_ADDRESS` (which `ray job submit` sets for the jobs it runs). Never anything in between: a plain
`ray.init()` would join whatever cluster last wrote its address file on this machine, or wait minutes for
one that died without `ray stop`."""
from __future__ import annotations

import logging
import os
import sys

LOOPBACK = "127.0.0.1"
# Ray binds its GCS server and raylets to the node's address, and resolves "127.0.0.1" to the primary
# interface unless multi-node clusters are off (its Windows/macOS mode, a constant read at import). Off, the
# embedded cluster listens on loopback only: nobody who can reach this machine can join it and run code.
_SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def embedded_environment() -> None:
    """Keep an embedded cluster on loopback. Must run before Ray is imported (the CLI does so first); a
    process that already imported Ray gets the same setting on Ray's constant."""
    os.environ[_SINGLE_NODE_ENV] = "0"  # inherited by every process the cluster starts
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def connect(address: str | None = None) -> str:
    """Connect this driver to Ray and say which cluster it uses; returns that line."""
    # Local clusters run without auth; otherwise the first init writes a token that later breaks
    # `ray job submit` (environment.md). Real clusters set RAY_AUTH_MODE=token (README).
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = address or os.environ.get("RAY_ADDRESS")
    already = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    if not (already or address):
        embedded_environment()
    import ray

    if already:
        where = f"the cluster this process is connected to ({ray.get_runtime_context().gcs_address})"
    elif address:
        ray.init(address=address, logging_level=logging.WARNING)
        where = f"joined the cluster at {address}"
    else:  # "local" always starts a new instance, whatever address file another cluster left behind
        ray.init(address="local", _node_ip_address=LOOPBACK, include_dashboard=False,
                 logging_level=logging.WARNING)
        where = f"embedded local cluster at {ray.get_runtime_context().gcs_address} (loopback only)"
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = True
    ctx.execution_options.preserve_order = False
    resources = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    line = (f"[x2edit] Ray: {where}; {nodes} node{'s' * (nodes != 1)}, {resources.get('CPU', 0):g} CPUs, "
            f"{resources.get('GPU', 0):g} GPUs")
    print(line, flush=True)
    return line
