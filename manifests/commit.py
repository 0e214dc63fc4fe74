"""The commit protocol: a reader never sees a half-written file, only the old state or the complete new file.

On a filesystem (local or shared): write to a temporary name, fsync, rename. Temporary files carry a
recognisable marker so that a rerun can discard whatever a killed process left behind. In an object store:
one whole PUT under the final name (atomic: a killed upload leaves no object); see manifests/storage.py.
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from manifests.storage import StorePath, store_path

TMP_MARKER = ".tmp-"


def _fsync_dir(path: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(where: Path | StorePath, data: bytes) -> None:
    if not (target := store_path(where)).is_local:
        target.put(data)
        return
    with atomic_writer(target) as f:
        f.write(data)


@contextmanager
def atomic_writer(where: Path | StorePath) -> Iterator[BinaryIO]:
    """A file to stream into (a file too large to hold, such as the ledger of millions of units), committed
    only when the block exits cleanly. In an object store it is spooled to a local temporary file and uploaded
    whole at the end: pyarrow completes an upload stream when it is dropped, so a writer that failed half-way
    would otherwise leave a truncated object under the final name."""
    target = store_path(where)
    if not target.is_local:
        with tempfile.TemporaryFile() as spool:
            yield spool
            spool.seek(0)
            with target.fs.open_output_stream(target.path) as out:
                shutil.copyfileobj(spool, out, 8 << 20)
        return
    path = Path(target.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARKER}{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed writer leaves nothing behind
        raise
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def atomic_write_parquet(path: Path | StorePath, table: pa.Table) -> None:
    atomic_write_bytes(path, parquet_bytes(table))


def discard_uncommitted(directory: Path | StorePath) -> list[StorePath]:
    """Delete temporary files left by killed writers; returns what was removed."""
    removed = [p for p in store_path(directory).iterdir() if TMP_MARKER in p.name]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed
