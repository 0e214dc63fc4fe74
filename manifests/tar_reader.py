"""Streaming reader for WebDataset tars in the img2dataset layout (KEY.jpg + KEY.json + KEY.txt).

Members of a sample are adjacent and split at the basename's first dot, as webdataset does. Names that
would escape, links, duplicate members, repeated keys, oversized members, a cut or garbled archive: each
becomes a reason code on a RawSample; nothing is extracted to disk and one sample is held at a time.
"""
from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from manifests.raw_sample import (IMAGE_EXTENSIONS, RawSample, build_sample, display_name,
                                  make_sample_id, occurrence_key)
from manifests.rejected import Rejected

TAR_UNIT_KEY = "__tar__"  # key of the one record that reports a corrupt or unreadable tar
KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext: split at the basename's first dot


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


def read_tar(uri: str, max_bytes: int) -> Iterator[RawSample]:
    occurrences: dict[str, int] = {}
    group: _TarGroup | None = None
    ordinal = 0
    try:
        with open(uri, "rb") as file, tarfile.open(fileobj=file, mode="r:", encoding="utf-8",
                                                   errors="surrogateescape") as tar:
            while (member := tar.next()) is not None:
                tar.members.clear()  # TarFile remembers every header it has read; we stream, so drop them
                split = KEY_EXT.match(member.name)
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
    occurrence = occurrences.get(TAR_UNIT_KEY, 0) + 1
    sample_id = make_sample_id(uri, occurrence_key(TAR_UNIT_KEY, occurrence))
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
        except Rejected as exc:
            group.error = (exc.reason, exc.message)
    elif ext in ("json", "txt"):
        try:
            group.sidecars[ext] = _read_member(tar, member, max_bytes)
        except Rejected as exc:
            group.warnings.append(f"bad_sidecar: {exc.message}")


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, max_bytes: int) -> bytes:
    if member.size > max_bytes:  # decided from the header: the data is never loaded
        raise Rejected("member_too_large", f"member {member.name!r} has {member.size} bytes > {max_bytes}")
    extracted = tar.extractfile(member)
    assert extracted is not None  # regular files always extract
    return extracted.read()


def _finish_group(uri: str, group: _TarGroup, ordinal: int) -> RawSample:
    error = group.error
    if error is None and group.image is None:
        error = ("no_image", f"key {group.key!r} has no {'/'.join(IMAGE_EXTENSIONS)} member")
    return build_sample(make_sample_id(uri, occurrence_key(group.key, group.occurrence)), f"{uri}#{display_name(group.key)}",
                   ordinal, group.image, group.sidecars, error, group.warnings)


