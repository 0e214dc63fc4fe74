"""Planning and streaming source samples from WebDataset tars or image folders.

Nothing here trusts its input: tar member names, links, sizes and sidecars are all checked, nothing is
extracted to disk, at most one sample is held in memory, and every unusable sample comes out as a
RawSample with an `error` reason code instead of an exception.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import posixpath
import re
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

# Image member extensions, in the order of preference when one sample holds several.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
_IMAGE_SUFFIXES = tuple(f".{ext}" for ext in IMAGE_EXTENSIONS)
_TAR_UNIT_KEY = "__tar__"  # key of the one record that reports a corrupt or unreadable tar
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext: split at the basename's first dot


@dataclass(frozen=True)
class InputUnit:
    """One read task: a tar (webdataset) or a chunk of relative file paths under a folder."""

    kind: str  # "webdataset" or "folder"
    uri: str
    index: int
    members: tuple[str, ...] = ()


@dataclass
class RawSample:
    sample_id: str
    source_uri: str
    ordinal: int  # position within its unit
    image: bytes | None  # None exactly when error is set
    meta: dict[str, Any]
    caption: str | None
    error: tuple[str, str] | None  # (reason_code, message)
    warnings: list[str] = field(default_factory=list)


class _Unusable(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


def make_sample_id(namespace: str, key: str) -> str:
    """Readable, dot-free (it becomes a WebDataset __key__) and unique through the hash of the exact strings."""
    stem = posixpath.basename(namespace.rstrip("/")).split(".")[0]
    readable = _ID_UNSAFE.sub("_", f"{stem}_{key}")[:48]
    # surrogatepass: names that were not valid UTF-8 still hash, and distinctly.
    digest = hashlib.sha1(f"{namespace}\0{key}".encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{readable}-{digest}"


def _id_key(key: str, occurrence: int) -> str:
    # A repeated tar key needs its own id. The last path component of a real key never holds a dot
    # (keys end at the first dot of the basename), so "key.N" cannot collide with one.
    return key if occurrence == 1 else f"{key}.{occurrence}"


def _display(text: str) -> str:
    """Undecodable bytes in file names become U+FFFD so that URIs are valid UTF-8 downstream."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


# ---------------------------------------------------------------------------------------------- planning


def plan_inputs(kind: str, paths: list[str], chunk_size: int) -> list[InputUnit]:
    """Expand paths/globs into read units: one per tar, or chunks of `chunk_size` files per folder."""
    if kind not in ("webdataset", "folder"):
        raise ValueError(f"unknown input kind {kind!r}; expected 'webdataset' or 'folder'")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    found: dict[tuple[str, tuple[str, ...]], None] = {}  # ordered set: a path listed twice is read once
    for pattern in paths:
        matches = [pattern] if os.path.exists(pattern) else sorted(glob.glob(pattern, recursive=True))
        units = [unit for match in matches for unit in _expand(kind, match, chunk_size)]
        if not units:
            what = ".tar files" if kind == "webdataset" else "image files"
            raise ValueError(f"no {what} found for input path {pattern!r}")
        found.update(dict.fromkeys(units))
    return [InputUnit(kind, uri, index, members) for index, (uri, members) in enumerate(found)]


def _expand(kind: str, match: str, chunk_size: int) -> list[tuple[str, tuple[str, ...]]]:
    """(uri, members) of the units under one matched path; non-tar files in a tar glob are ignored."""
    if kind == "webdataset":
        if os.path.isdir(match):
            return [(os.path.join(match, rel), ()) for rel in _list_files(match, (".tar",))]
        return [(match, ())] if match.lower().endswith(".tar") else []
    if not os.path.isdir(match):
        return []
    files = _list_files(match, _IMAGE_SUFFIXES)
    return [(match, tuple(files[i:i + chunk_size])) for i in range(0, len(files), chunk_size)]


def _list_files(root: str, suffixes: tuple[str, ...]) -> list[str]:
    """Sorted relative POSIX paths of non-hidden files under root; symlinked directories are not entered."""
    def fail(exc: OSError) -> None:
        raise exc  # an unreadable directory must not silently shrink the input

    found = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=fail):  # followlinks=False
        dirnames[:] = [name for name in dirnames if not name.startswith(".")]
        found.extend(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
                     for name in filenames if not name.startswith(".") and name.lower().endswith(suffixes))
    return sorted(found)


# ----------------------------------------------------------------------------------------------- reading


def read_unit(unit: InputUnit, *, max_member_bytes: int) -> Iterator[RawSample]:
    """Stream the unit's samples in order. Never raises for bad data and never writes to disk."""
    if unit.kind == "webdataset":
        return _read_tar(unit.uri, max_member_bytes)
    if unit.kind == "folder":
        return _read_folder(unit, max_member_bytes)
    raise ValueError(f"unknown input kind {unit.kind!r}")


def _sample(sample_id: str, source_uri: str, ordinal: int, image: bytes | None, sidecars: dict[str, bytes],
            error: tuple[str, str] | None, warnings: list[str]) -> RawSample:
    meta = _parse_meta(sidecars.get("json"), warnings)
    caption = _parse_caption(sidecars.get("txt"), warnings)
    return RawSample(sample_id, source_uri, ordinal, None if error else image, meta, caption, error, warnings)


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-standard JSON constant {name}")  # NaN/Infinity would break strict JSON writers later


def _parse_meta(data: bytes | None, warnings: list[str]) -> dict[str, Any]:
    if data is None:
        return {}
    try:
        meta = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        warnings.append(f"bad_sidecar: json is not UTF-8 ({exc.reason} at byte {exc.start})")
        return {}
    except (ValueError, RecursionError) as exc:  # RecursionError: deeply nested arrays
        warnings.append(f"bad_sidecar: invalid JSON ({type(exc).__name__}: {exc})")
        return {}
    if not isinstance(meta, dict):
        warnings.append(f"bad_sidecar: expected a JSON object, got {type(meta).__name__}")
        return {}
    return meta


def _parse_caption(data: bytes | None, warnings: list[str]) -> str | None:
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        warnings.append(f"caption_not_utf8: {exc.reason} at byte {exc.start}; invalid bytes replaced")
        return data.decode("utf-8", errors="replace")


# ------------------------------------------------------------------------------------------------- tars


@dataclass
class _TarGroup:
    """The adjacent members of one tar key, collected until the key changes."""

    key: str
    occurrence: int  # 1 for the first group with this key in the tar
    error: tuple[str, str] | None = None
    names: set[str] = field(default_factory=set)
    image_name: str | None = None
    image_rank: int = 0  # position of the image's extension in IMAGE_EXTENSIONS
    image: bytes | None = None
    sidecars: dict[str, bytes] = field(default_factory=dict)  # "json"/"txt" -> contents
    warnings: list[str] = field(default_factory=list)


def _is_unsafe_name(name: str) -> bool:
    """Names that would land outside an extraction directory on POSIX or Windows."""
    return (name.startswith("/") or "\\" in name or re.match(r"^[A-Za-z]:", name) is not None
            or ".." in name.split("/"))


def _read_tar(uri: str, max_bytes: int) -> Iterator[RawSample]:
    occurrences: dict[str, int] = {}
    group: _TarGroup | None = None
    ordinal = 0
    try:
        with open(uri, "rb") as file, tarfile.open(fileobj=file, mode="r:", encoding="utf-8",
                                                   errors="surrogateescape") as tar:
            while (member := tar.next()) is not None:
                tar.members.clear()  # TarFile remembers every header it has read; we stream, so drop them
                split = _KEY_EXT.match(member.name)
                if member.isdir() or split is None:
                    continue  # directories and extension-less names belong to no sample (as in webdataset)
                key, ext = split.groups()
                if group is None or key != group.key:
                    if group is not None:
                        yield _finish_group(uri, group, ordinal)
                        ordinal += 1
                    occurrences[key] = occurrences.get(key, 0) + 1
                    group = _TarGroup(key, occurrences[key])
                    if group.occurrence > 1:
                        group.error = ("duplicate_key", f"key {key!r} already appeared earlier in the tar")
                _add_member(tar, member, ext, group, max_bytes)
            problem = None if _ends_with_marker(file, tar.offset) else "no end-of-archive marker (truncated?)"
    except (OSError, EOFError, tarfile.TarError, ValueError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - tarfile parses hostile headers; keep the class name visible
        problem = f"unexpected {type(exc).__name__}: {exc}"
    if problem is None:
        if group is not None:
            yield _finish_group(uri, group, ordinal)
        return
    # The group being read when the tar broke may be incomplete; it is covered by this record.
    if group is not None:
        problem += f"; sample {group.key!r} and everything after it lost"
    occurrence = occurrences.get(_TAR_UNIT_KEY, 0) + 1
    sample_id = make_sample_id(uri, _id_key(_TAR_UNIT_KEY, occurrence))
    yield RawSample(sample_id, uri, ordinal, None, {}, None, ("corrupt_tar", problem), [])


def _ends_with_marker(file: Any, offset: int) -> bool:
    """tarfile stops silently at a cut or garbled header; a complete archive has a zero block there."""
    file.seek(offset)
    return file.read(tarfile.BLOCKSIZE) == bytes(tarfile.BLOCKSIZE)


def _add_member(tar: tarfile.TarFile, member: tarfile.TarInfo, ext: str, group: _TarGroup,
                max_bytes: int) -> None:
    if group.error is not None:
        return  # the sample is already lost: read nothing more of it
    name = member.name
    if _is_unsafe_name(name):
        group.error = ("unsafe_member_name", f"member {name!r} would escape the archive root")
    elif not member.isfile():
        group.error = ("not_a_regular_file", f"member {name!r} is a link or device, not a file")
    elif name in group.names:
        group.error = ("duplicate_member", f"member {name!r} appears twice in one sample")
    group.names.add(name)
    if group.error is not None:
        return
    ext = ext.lower()
    if ext in IMAGE_EXTENSIONS:
        rank = IMAGE_EXTENSIONS.index(ext)
        if group.image_name is not None:
            better = rank < group.image_rank
            kept, dropped = (name, group.image_name) if better else (group.image_name, name)
            group.warnings.append(f"multiple_images: using {kept!r}, ignoring {dropped!r}")
            if not better:
                return
        try:
            group.image, group.image_name, group.image_rank = _read_member(tar, member, max_bytes), name, rank
        except _Unusable as exc:
            group.error = (exc.reason, exc.message)
    elif ext in ("json", "txt"):
        try:
            group.sidecars[ext] = _read_member(tar, member, max_bytes)
        except _Unusable as exc:
            group.warnings.append(f"bad_sidecar: {exc.message}")


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, max_bytes: int) -> bytes:
    if member.size > max_bytes:  # decided from the header: the data is never loaded
        raise _Unusable("member_too_large", f"member {member.name!r} has {member.size} bytes > {max_bytes}")
    extracted = tar.extractfile(member)
    assert extracted is not None  # regular files always extract
    return extracted.read()


def _finish_group(uri: str, group: _TarGroup, ordinal: int) -> RawSample:
    error = group.error
    if error is None and group.image is None:
        error = ("no_image", f"key {group.key!r} has no {'/'.join(IMAGE_EXTENSIONS)} member")
    return _sample(make_sample_id(uri, _id_key(group.key, group.occurrence)), f"{uri}#{_display(group.key)}",
                   ordinal, group.image, group.sidecars, error, group.warnings)


# ---------------------------------------------------------------------------------------------- folders


def _read_folder(unit: InputUnit, max_bytes: int) -> Iterator[RawSample]:
    root_real = os.path.realpath(unit.uri)
    for ordinal, rel in enumerate(unit.members):
        warnings: list[str] = []
        image, error = None, None
        try:
            image = _read_folder_file(unit.uri, root_real, rel, max_bytes)
        except _Unusable as exc:
            error = (exc.reason, exc.message)
        sidecars: dict[str, bytes] = {}
        for ext in ("json", "txt"):
            sidecar = f"{os.path.splitext(rel)[0]}.{ext}"
            try:
                if (data := _read_folder_file(unit.uri, root_real, sidecar, max_bytes, missing_ok=True)) is not None:
                    sidecars[ext] = data
            except _Unusable as exc:
                warnings.append(f"bad_sidecar: {sidecar!r}: {exc.reason}: {exc.message}")
        # The id key is the path with its extension: a.jpg and a.png are two distinct samples.
        yield _sample(make_sample_id(unit.uri, rel), posixpath.join(unit.uri, _display(rel)), ordinal,
                      image, sidecars, error, warnings)


def _read_folder_file(root: str, root_real: str, rel: str, max_bytes: int,
                      missing_ok: bool = False) -> bytes | None:
    path = os.path.join(root, rel)
    if missing_ok and not os.path.lexists(path):
        return None
    real = os.path.realpath(path)
    if os.path.isabs(rel) or ".." in rel.split("/") or os.path.commonpath([root_real, real]) != root_real:
        raise _Unusable("unsafe_path", f"{rel!r} resolves outside the input folder")
    try:
        # O_NONBLOCK: opening a FIFO must not hang the reader; O_NOFOLLOW: no link swapped in since realpath.
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        with open(fd, "rb") as file:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise _Unusable("not_a_regular_file", f"{rel!r} is not a regular file")
            data = file.read(max_bytes + 1)  # +1: notices a file that grew past the limit after fstat
    except OSError as exc:
        raise _Unusable("read_error", f"{rel!r}: {exc.strerror or exc}") from exc
    if len(data) > max_bytes:
        raise _Unusable("member_too_large", f"{rel!r} has more than {max_bytes} bytes")
    return data
