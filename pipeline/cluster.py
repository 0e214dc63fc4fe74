"""Connecting to Ray: an embedded local cluster by default, or the cluster a job was submitted to."""
from __future__ import annotations

import logging
import os


def connect(address: str | None = None) -> None:
    # Local clusters run without auth; otherwise the first init writes a token that later breaks
    # `ray job submit` (environment.md).
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")  # set inside `ray job submit`
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:  # an embedded cluster in this process, sized to the machine
        ray.init(include_dashboard=False, logging_level=logging.WARNING)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = True
    ctx.execution_options.preserve_order = False
