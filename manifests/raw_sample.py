"""Source samples as the readers yield them: read units, raw samples, their ids, and sidecar parsing.

Shared by the tar and folder readers (manifests/tar_reader.py, manifests/inputs.py). Nothing here trusts its
input: an unusable sample becomes a RawSample with an `error` reason code, a bad sidecar a warning.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

from manifests.images import IMAGE_FORMATS

# Image member extensions (exactly those the decoder reads), in the order of preference when one sample
# holds several.
IMAGE_EXTENSIONS = tuple(IMAGE_FORMATS)
IMAGE_SUFFIXES = tuple(f".{ext}" for ext in IMAGE_EXTENSIONS)
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


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
    failed: bool = False  # the error is the system's (the row fails), not the input's (it is rejected)


def make_sample_id(namespace: str, key: str) -> str:
    """Readable, dot-free (it becomes a WebDataset __key__) and unique through the hash of the exact strings."""
    stem = posixpath.basename(namespace.rstrip("/")).split(".")[0]
    readable = _ID_UNSAFE.sub("_", f"{stem}_{key}")[:48]
    # surrogatepass: names that were not valid UTF-8 still hash, and distinctly.
    digest = hashlib.sha1(f"{namespace}\0{key}".encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{readable}-{digest}"


def occurrence_key(key: str, occurrence: int) -> str:
    # A repeated tar key needs its own id. The last path component of a real key never holds a dot
    # (keys end at the first dot of the basename), so "key.N" cannot collide with one.
    return key if occurrence == 1 else f"{key}.{occurrence}"


def display_name(text: str) -> str:
    """Undecodable bytes in file names become U+FFFD so that URIs are valid UTF-8 downstream."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def build_sample(sample_id: str, source_uri: str, ordinal: int, image: bytes | None, sidecars: dict[str, bytes],
            error: tuple[str, str] | None, warnings: list[str]) -> RawSample:
    meta = parse_meta(sidecars.get("json"), warnings)
    caption = parse_caption(sidecars.get("txt"), warnings)
    return RawSample(sample_id, source_uri, ordinal, None if error else image, meta, caption, error, warnings)


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-standard JSON constant {name}")  # NaN/Infinity would break strict JSON writers later


def parse_meta(data: bytes | None, warnings: list[str]) -> dict[str, Any]:
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


def parse_caption(data: bytes | None, warnings: list[str]) -> str | None:
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        warnings.append(f"caption_not_utf8: {exc.reason} at byte {exc.start}; invalid bytes replaced")
        return data.decode("utf-8", errors="replace")


