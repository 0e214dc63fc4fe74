"""Where a run dir lives: a local or shared-filesystem folder, or a prefix in an object store (`s3://`,
`gs://`, …), behind one small path type over `pyarrow.fs`.

Why pyarrow.fs rather than fsspec: pyarrow is already how every fragment, manifest and ledger is read and
written, Ray Data takes its filesystems as they are, and its S3/GCS clients are native (no aiobotocore pin to
fight, environment.md). `StorePath` offers the few `pathlib.Path` operations the run dir needs, so the code
that walks a run dir reads the same whichever store holds it. Credentials and endpoints come from the
environment the way pyarrow reads them (`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL`, …), never from a recipe.

Commit (manifests/commit.py): on a filesystem a file is written to a temporary name, fsynced and renamed; an
object store has no atomic rename, but a PUT is atomic, so each object is written whole under its final name
and the object that commits a unit is written last (a shard's manifest after its tar; a stage's
COMPLETE.json after its fragments; a fragment is one object, its own marker).
"""
from __future__ import annotations

import fnmatch
import io
import json
import posixpath
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


# An object-store read is a request (milliseconds): a tar walked through this buffer costs a request per MiB,
# not one per 512-byte header (a 256-member shard on an S3 server: 12 requests instead of 578). A local walk
# keeps Python's default buffer: it seeks over the members it skips instead of reading them.
WALK_BUFFER = 1 << 20


class StorePath:
    """A file or folder of a pyarrow filesystem. Local paths keep `os.fspath` (tarfile, open, PIL take them
    as before); a remote one has none, so code that would bypass the store fails loudly instead of writing
    a local folder named `s3:`."""

    def __init__(self, fs: pafs.FileSystem, path: str, scheme: str = "", query: str = ""):
        self.fs, self.path, self.scheme, self.query = fs, path.rstrip("/") or "/", scheme, query

    def __reduce__(self):
        # Sent to a Ray worker as its URL: the worker opens the store with its own environment's credentials,
        # which a pickled filesystem object would otherwise carry through the object store.
        return store_path, (str(self),)

    @property
    def is_local(self) -> bool:
        return not self.scheme

    def __str__(self) -> str:
        if not self.scheme:
            return self.path
        return f"{self.scheme}://{self.path}" + (f"?{self.query}" if self.query else "")

    def __repr__(self) -> str:
        return f"StorePath({str(self)!r})"

    def __fspath__(self) -> str:
        if not self.is_local:
            raise TypeError(f"{self} is in an object store: open it through manifests.storage, not as a local path")
        return self.path

    def __eq__(self, other) -> bool:
        return isinstance(other, StorePath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __lt__(self, other: StorePath) -> bool:
        return self.path < other.path

    # ---------------------------------------------------------------------------------------- names
    def _at(self, path: str) -> StorePath:
        return StorePath(self.fs, path, self.scheme, self.query)

    def __truediv__(self, name: str) -> StorePath:
        return self._at(posixpath.join(self.path, str(name)))

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def stem(self) -> str:
        return posixpath.splitext(self.name)[0]

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def parent(self) -> StorePath:
        return self._at(posixpath.dirname(self.path))

    def bucket(self) -> StorePath | None:
        """The bucket of an object-store path (None on a filesystem): the part that must exist beforehand."""
        return None if self.is_local else self._at(self.path.split("/")[0])

    def with_name(self, name: str) -> StorePath:
        return self.parent / name

    def with_suffix(self, suffix: str) -> StorePath:
        return self.parent / f"{self.stem}{suffix}"

    # ---------------------------------------------------------------------------------------- queries
    def _type(self) -> pafs.FileType:
        return self.fs.get_file_info(self.path).type

    def exists(self) -> bool:
        return self._type() != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self._type() == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self._type() == pafs.FileType.File

    def size(self) -> int:
        return self.fs.get_file_info(self.path).size

    def iterdir(self) -> list[StorePath]:
        """The entries directly under this folder (none when it does not exist), in name order. One listing
        request per 1,000 entries on an object store."""
        return [self._at(i.path) for i in self._listing()]

    def glob(self, pattern: str) -> list[StorePath]:
        """Entries directly under this folder whose name matches `pattern` (fnmatch; one level only)."""
        return [p for p in self.iterdir() if fnmatch.fnmatchcase(p.name, pattern)]

    def sizes(self, pattern: str = "*") -> dict[str, int]:
        """Name → size of the files directly under this folder matching `pattern`, from the one listing (no
        request per file)."""
        return {i.base_name: i.size for i in self._listing()
                if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.base_name, pattern)}

    def _listing(self) -> list[pafs.FileInfo]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted(infos, key=lambda i: i.path)

    # ---------------------------------------------------------------------------------------- bytes
    def open(self, mode: str = "rb"):
        """A seekable binary file to read (pyarrow's; file-like for tarfile, PIL, pyarrow.parquet)."""
        if mode != "rb":
            raise ValueError(f"{self}: open for reading only; write through manifests.commit")
        return self.fs.open_input_file(self.path)

    def open_walk(self) -> io.BufferedReader:
        """Opened for a walk front to back (tar headers, a checksum): seekable, read WALK_BUFFER at a time from an
        object store."""
        return io.BufferedReader(self.open(), io.DEFAULT_BUFFER_SIZE if self.is_local else WALK_BUFFER)

    def read_bytes(self) -> bytes:
        with self.open() as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def read_json(self):
        """The parsed file, or None when there is none (one request on an object store, not an exists + a read)."""
        try:
            return json.loads(self.read_text())
        except FileNotFoundError:
            return None

    def put(self, data: bytes) -> None:
        """Write the whole file under its name at once: in an object store one atomic PUT; on a filesystem a
        reader could see it half-written (manifests.commit.atomic_write_bytes renames instead)."""
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)

    def mkdir(self, parents: bool = True, exist_ok: bool = True) -> None:
        if self.is_local:  # an object store has no folders: a prefix exists once an object is under it
            Path(self.path).mkdir(parents=parents, exist_ok=exist_ok)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise


def store_path(where: str | Path | StorePath) -> StorePath:
    """A local path (made absolute) or a URL such as `s3://bucket/prefix` (endpoint and credentials from the
    environment, e.g. AWS_ENDPOINT_URL for an S3-compatible server)."""
    if isinstance(where, StorePath):
        return where
    text = str(where)
    if "://" not in text:
        return StorePath(pafs.LocalFileSystem(), str(Path(text).resolve()))
    scheme = text.split("://", 1)[0]
    if scheme == "file":
        return store_path(text[len("file://"):])
    try:
        fs, path = pafs.FileSystem.from_uri(text)  # options in the query, e.g. ?endpoint_override=host:port
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{text}: not a storage location pyarrow can open ({e})") from None
    return StorePath(fs, path, scheme, text.partition("?")[2])


def read_parquet(path: StorePath, columns: list[str] | None = None, filters=None) -> pa.Table:
    """One Parquet file's rows (some columns, optionally filtered), read through one open of the file."""
    with path.open() as f:
        if filters is None:
            return pq.ParquetFile(f).read(columns=columns, use_threads=False)  # read_table: 2-3x slower
        return pq.read_table(f, columns=columns, filters=filters)


def parquet_schema(path: StorePath) -> pa.Schema:
    """A Parquet file's schema with its metadata (the footer only)."""
    with path.open() as f:
        return pq.read_schema(f)
