"""The commit protocol: write to a temporary name, fsync, rename.

A reader never sees a half-written file: it either sees the old state or the complete new file. Temporary
files carry a recognisable marker so that a rerun can discard whatever a killed process left behind.
"""
from __future__ import annotations

import io
import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

TMP_MARKER = ".tmp-"


def _fsync_dir(path: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARKER}{uuid.uuid4().hex}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def atomic_write_parquet(path: Path, table: pa.Table) -> None:
    atomic_write_bytes(path, parquet_bytes(table))


def discard_uncommitted(directory: Path) -> list[Path]:
    """Delete temporary files left by killed writers; returns what was removed."""
    directory = Path(directory)
    if not directory.exists():
        return []
    removed = [p for p in directory.iterdir() if TMP_MARKER in p.name]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed
