"""Connecting to Ray: a fresh embedded cluster on loopback by default, or the cluster named by `--address`
/ `RAY_ADDRESS` (which `ray job submit` sets for the jobs it runs). Never anything in between: a plain
`ray.init()` would join whatever cluster last wrote its address file on this machine, or wait minutes for
one that died without `ray stop`."""
from __future__ import annotations

import logging
import os
import sys
import uuid
from pathlib import Path

from manifests.commit import atomic_write_bytes
from manifests.storage import StorePath, store_path

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


def connect(address: str | None = None, run_dir: Path | StorePath | None = None) -> str:
    """Connect this driver to Ray and say which cluster it uses; returns that line. Joining a cluster (not
    starting one here), the run dir must be the same folder on every node (`check_shared_run_dir`)."""
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
        # Ray's default object store is 30 % of RAM and Ray Data lets blocks queue in up to half of it, so a
        # fast source reads ahead into shared memory that stays allocated as long as the cluster lives. A few
        # blocks in flight per core is all streaming needs (bench/README.md, "Engine overhead": half this store
        # cost the identity bench ~12 % of its samples/s for 0.25 GB less; a quarter of it spilled to disk).
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        store = min(max(512 << 20, (os.cpu_count() or 1) * (256 << 20)), int(0.3 * ram))
        ray.init(address="local", _node_ip_address=LOOPBACK, include_dashboard=False,
                 object_store_memory=store, logging_level=logging.WARNING,
                 # Ray keeps one idle worker per CPU warm, each ~120 MB once it has run a Ray Data task; the
                 # pipeline's few tasks (fragment commits) need one.
                 _system_config={"num_workers_soft_limit": 1},
                 # Workers give freed memory back: Arrow through malloc instead of mimalloc (which keeps
                 # it), malloc trimming at 1 MB and with two arenas instead of one per thread. The identity
                 # bench's stage actors end at ~120 MB instead of ~195 MB, at the same samples/s.
                 runtime_env={"env_vars": {"ARROW_DEFAULT_MEMORY_POOL": "system", "MALLOC_ARENA_MAX": "2",
                                           "MALLOC_TRIM_THRESHOLD_": str(1 << 20)}})
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
    if run_dir is not None and (already or address):
        check_shared_run_dir(run_dir)
    return line


class RunDirNotShared(RuntimeError):
    """The run dir is not the same folder on every node of the cluster the run joined."""


PROBE_PREFIX = ".x2edit-probe-"


def check_shared_run_dir(run_dir: Path | StorePath) -> None:
    """Every alive node must read the run dir the driver writes: stage actors on other nodes write their
    fragments there and the driver reads them back, so a folder only the driver's machine has would lose them
    (or leave them on each node's own disk). Checked honestly, not guessed from the path: the driver writes a
    probe file with a random token, and a zero-CPU task pinned to each node reads it back."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex
    probe = store_path(run_dir) / f"{PROBE_PREFIX}{token}"
    atomic_write_bytes(probe, token.encode())
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        read = ray.remote(num_cpus=0, max_retries=0)(_read_probe)
        answers = ray.get([read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                           .remote(str(probe)) for n in nodes])
    finally:
        probe.unlink()
    blind = [f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})" for n, seen in zip(nodes, answers) if seen != token]
    if blind:
        raise RunDirNotShared(
            f"--run-dir {run_dir} is not visible from {len(blind)} of the cluster's {len(nodes)} nodes "
            f"({', '.join(blind)}): stage actors there could not write their output where this driver reads it. "
            "Use a folder every node mounts at the same path (a shared filesystem such as NFS), an object store "
            "every node can reach (s3://bucket/prefix, with its credentials on every node), or run the driver "
            "on a node that shares it")


def _read_probe(path: str) -> str | None:
    try:
        return store_path(path).read_text()
    except OSError:  # not there on this node (or no access to its store): the answer the driver needs
        return None
