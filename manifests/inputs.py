"""Planning and streaming source samples from WebDataset tars or image folders.

Nothing here trusts its input: tar member names, links, sizes and sidecars are all checked, nothing is
extracted to disk, at most one sample is held in memory, and every unusable sample comes out as a
RawSample with an `error` reason code instead of an exception. Tars are read by manifests/tar_reader.py.
"""
from __future__ import annotations

import glob
import json
import os
import posixpath
import stat
from collections.abc import Iterator

from braceexpand import braceexpand

from manifests.raw_sample import (IMAGE_SUFFIXES, InputUnit, RawSample, build_sample, display_name,
                                  make_sample_id)
from manifests.rejected import Rejected
from manifests.tar_reader import read_tar

__all__ = ["InputUnit", "RawSample", "make_sample_id", "plan_inputs", "plan_prompts", "read_unit"]


# ---------------------------------------------------------------------------------------------- planning


def plan_inputs(kind: str, paths: list[str], chunk_size: int) -> list[InputUnit]:
    """Expand paths, brace patterns (`shards-{000000..000099}.tar`, the WebDataset convention) and globs into
    read units: one per tar, or chunks of `chunk_size` files per folder. A path or brace member that
    matches nothing is an error naming it: a silently shorter input would be worse."""
    if kind not in ("webdataset", "folder"):
        raise ValueError(f"unknown input kind {kind!r}; expected 'webdataset' or 'folder'")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    what = ".tar files" if kind == "webdataset" else "image files"
    found: dict[tuple[str, tuple[str, ...]], None] = {}  # ordered set: a path listed twice is read once
    for matches in _each_pattern(paths, what, lambda m: _expand(kind, m, chunk_size)):
        found.update(dict.fromkeys(matches))
    return [InputUnit(kind, uri, index, members) for index, (uri, members) in enumerate(found)]


def plan_prompts(paths: list[str], chunk_size: int, first_index: int = 0) -> list[InputUnit]:
    """Read units of prompt files (UTF-8, one prompt per non-empty line; paths as in `plan_inputs`): chunks
    of `chunk_size` prompts, each member the JSON [line number, text], so reading a unit opens no file."""
    found: dict[str, None] = {}
    for files in _each_pattern(paths, "prompt files", lambda m: [m] if os.path.isfile(m) else []):
        found.update(dict.fromkeys(files))
    units = []
    for path in found:
        with open(path, encoding="utf-8", errors="replace") as f:  # a bad byte costs one character, not the file
            lines = [json.dumps([n, line.strip()], ensure_ascii=False) for n, line in enumerate(f) if line.strip()]
        units += [InputUnit("prompts", path, first_index + len(units) + i // chunk_size,
                            tuple(lines[i:i + chunk_size])) for i in range(0, len(lines), chunk_size)]
    return units


def _each_pattern(paths: list[str], what: str, expand) -> Iterator[list]:
    """`expand(match)` for the matches of each path, brace member and glob; an empty one is an error."""
    for given in paths:
        for pattern in braceexpand(given):
            matches = [pattern] if os.path.exists(pattern) else sorted(glob.glob(pattern, recursive=True))
            found = [item for match in matches for item in expand(match)]
            if not found:
                origin = f" (from {given!r})" if pattern != given else ""
                raise ValueError(f"no {what} found for input path {pattern!r}{origin}")
            yield found


def _expand(kind: str, match: str, chunk_size: int) -> list[tuple[str, tuple[str, ...]]]:
    """(uri, members) of the units under one matched path; non-tar files in a tar glob are ignored."""
    if kind == "webdataset":
        if os.path.isdir(match):
            return [(os.path.join(match, rel), ()) for rel in _list_files(match, (".tar",))]
        return [(match, ())] if match.lower().endswith(".tar") else []
    if not os.path.isdir(match):
        return []
    files = _list_files(match, IMAGE_SUFFIXES)
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
        return read_tar(unit.uri, max_member_bytes)
    if unit.kind == "folder":
        return _read_folder(unit, max_member_bytes)
    raise ValueError(f"unknown input kind {unit.kind!r}")


# ---------------------------------------------------------------------------------------------- folders


def _read_folder(unit: InputUnit, max_bytes: int) -> Iterator[RawSample]:
    root_real = os.path.realpath(unit.uri)
    for ordinal, rel in enumerate(unit.members):
        warnings: list[str] = []
        image, error = None, None
        try:
            image = _read_folder_file(unit.uri, root_real, rel, max_bytes)
        except Rejected as exc:
            error = (exc.reason, exc.message)
        sidecars: dict[str, bytes] = {}
        for ext in ("json", "txt"):
            sidecar = f"{os.path.splitext(rel)[0]}.{ext}"
            try:
                if (data := _read_folder_file(unit.uri, root_real, sidecar, max_bytes, missing_ok=True)) is not None:
                    sidecars[ext] = data
            except Rejected as exc:
                warnings.append(f"bad_sidecar: {sidecar!r}: {exc.reason}: {exc.message}")
        # The id key is the path with its extension: a.jpg and a.png are two distinct samples.
        yield build_sample(make_sample_id(unit.uri, rel), posixpath.join(unit.uri, display_name(rel)), ordinal,
                      image, sidecars, error, warnings)


def _read_folder_file(root: str, root_real: str, rel: str, max_bytes: int,
                      missing_ok: bool = False) -> bytes | None:
    path = os.path.join(root, rel)
    if missing_ok and not os.path.lexists(path):
        return None
    real = os.path.realpath(path)
    if os.path.isabs(rel) or ".." in rel.split("/") or os.path.commonpath([root_real, real]) != root_real:
        raise Rejected("unsafe_path", f"{rel!r} resolves outside the input folder")
    try:
        # O_NONBLOCK: opening a FIFO must not hang the reader; O_NOFOLLOW: no link swapped in since realpath.
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        with open(fd, "rb") as file:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise Rejected("not_a_regular_file", f"{rel!r} is not a regular file")
            data = file.read(max_bytes + 1)  # +1: notices a file that grew past the limit after fstat
    except OSError as exc:
        raise Rejected("read_error", f"{rel!r}: {exc.strerror or exc}") from exc
    if len(data) > max_bytes:
        raise Rejected("member_too_large", f"{rel!r} has more than {max_bytes} bytes")
    return data
