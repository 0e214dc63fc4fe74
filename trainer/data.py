"""Training data: editing pairs from corpus shards and reference-format X2Edit shards, by random access.

An index of every pair (shard, member offsets, task id) is built once by walking the tar headers and reading
only the json members, so the P×K sampler can pick pairs by task and a run can resume at an exact position.
Two layouts are read:
  - this project's corpus: `<key>.src.jpg`, `<key>.edited.jpg`, `<key>.json` (instruction_en/zh, task_id);
  - the X2Edit release: source `1.0.jpg` (also `.1.0.jpg`, `.1.jpg`, `1.jpg`, as the reference's
    `verify_keys` accepts), target `2.jpg` (or `.2.jpg`), json with `task`/`label` in Chinese or English
    and `instruction`/`instruction_en`/`instruction_zh`; labels map through the one taxonomy.
Images are resized and centre-cropped to an aspect bucket: 512² at 512 px, the reference's 13 ~1 MP
buckets at 1024 px. Shards are local files or objects (`s3://bucket/run/shards/x2edit-*.tar`: a wildcard in the
last path component only; endpoint and credentials from the environment), read through manifests/storage.py.

Shards are untrusted input, read as the pipeline reads its own: images only through the decoders of the
format allow-list, under a pixel limit (manifests/images.py). A pair whose json does not parse or whose image
header is refused is left out of the index and counted by reason; a pair whose image fails to decode when
drawn is replaced by the next readable pair of its task and aspect bucket (so a batch keeps its P×K shape on
every process) and counted in the batch (`skipped`), which the training log records.
"""
from __future__ import annotations

import glob
import json
import tarfile
from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image

from manifests.buckets import nearest_bucket
from manifests.images import decode_image, header_size
from manifests.rejected import Rejected
from manifests.storage import store_path
from manifests.taxonomy import task_for_label

SOURCE_FIELDS = ("src.jpg", "1.0.jpg", ".1.0.jpg", ".1.jpg", "1.jpg")
TARGET_FIELDS = ("edited.jpg", "2.jpg", ".2.jpg")
MAX_PIXELS = 1 << 26  # 64 MP: far above the 1 MP training buckets, far below a decompression bomb


@dataclass(frozen=True)
class PairRef:
    shard: str  # a path or a URL
    key: str
    task_id: int
    instruction_en: str
    instruction_zh: str
    source: tuple[int, int]  # (offset, size) of the member in the tar
    target: tuple[int, int]
    size: tuple[int, int]  # target image (width, height), read from its header


def _split(name: str) -> tuple[str, str]:
    """Key and field as WebDataset splits them (first dot of the basename); `k..1.jpg` keeps its dot."""
    directory, _, base = name.rpartition("/")
    key, _, field = base.partition(".")
    return (f"{directory}/{key}" if directory else key), field


def pair_record(meta: dict) -> tuple[int, str, str]:
    """(task id, English, Chinese instruction) from a corpus or reference-format json."""
    task = meta["task_id"] if isinstance(meta.get("task_id"), int) else task_for_label(meta.get("task") or meta.get("label")).id
    en, zh = meta.get("instruction_en") or "", meta.get("instruction_zh") or ""
    plain = meta.get("instruction") or ""  # the reference writes English or Chinese here, by script
    if plain and plain.isascii() and not en:
        en = plain
    elif plain and not plain.isascii() and not zh:
        zh = plain
    return task, en, zh


def expand(pattern: str) -> list[str]:
    """The shards a pattern names: `glob` for local paths; for a URL, the objects whose name matches its last
    component (one listing: an object store has no folders to walk)."""
    if "://" not in pattern:
        return glob.glob(pattern)
    folder, _, name = pattern.rpartition("/")
    return [str(p) for p in store_path(folder).glob(name)]


def index_shards(patterns: list[str], skipped: Counter | None = None) -> list[PairRef]:
    """Every pair with a source, a target and a json in the matching tars, in a stable order. A pair left out
    for a bad json or a refused image header is counted in `skipped` by reason."""
    shards = sorted({p for pattern in patterns for p in expand(pattern)})
    if not shards:
        raise FileNotFoundError(f"no training shards match {patterns}")
    skipped = Counter() if skipped is None else skipped
    pairs = []
    for shard in shards:
        with store_path(shard).open_walk() as f:  # one handle per shard: its header walk, then the image headers
            pairs += _index_shard(shard, f, skipped)
    return pairs


def _index_shard(shard: str, file, skipped: Counter) -> list[PairRef]:
    """The pairs of one open shard: its members from the tar headers, then each pair's json and image headers."""
    members: dict[str, dict[str, tuple[int, int]]] = {}
    metas: dict[str, bytes] = {}
    with tarfile.open(fileobj=file, mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, field = _split(info.name)
            members.setdefault(key, {})[field] = (info.offset_data, info.size)
            if field == "json":
                metas[key] = tar.extractfile(info).read()
    pairs = []
    for key, fields in members.items():
        src = next((fields[f] for f in SOURCE_FIELDS if f in fields), None)
        tgt = next((fields[f] for f in TARGET_FIELDS if f in fields), None)
        if not (src and tgt and key in metas):
            continue
        try:
            meta = json.loads(metas[key])
            if not isinstance(meta, dict):
                raise ValueError(f"a {type(meta).__name__}, not an object")
            task, en, zh = pair_record(meta)
        except (ValueError, TypeError, AttributeError):  # a JSONDecodeError is a ValueError; wrong types
            skipped["bad_json"] += 1
            continue
        try:
            header_size(_member(file, src, 1 << 16), max_pixels=MAX_PIXELS)
            size = _image_size(file, tgt)
        except Rejected as e:
            skipped[e.reason] += 1
            continue
        pairs.append(PairRef(shard, key, task, en, zh, src, tgt, size))
    return pairs


def _member(file, where: tuple[int, int], limit: int | None = None) -> bytes:
    """Bytes of a member (at most `limit`) from an open shard, by its (offset, size)."""
    file.seek(where[0])
    return file.read(where[1] if limit is None else min(where[1], limit))


def _image_size(file, where: tuple[int, int]) -> tuple[int, int]:
    """Width and height from the image header: the first 64 KiB hold it for any JPEG/PNG we write."""
    try:
        return header_size(_member(file, where, 1 << 16), max_pixels=MAX_PIXELS)
    except Rejected as e:
        if e.reason != "decode_error":
            raise
        return header_size(_member(file, where), max_pixels=MAX_PIXELS)  # a long header (big EXIF block)


def bucket_for(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(height, width) to train and edit at: the closest-aspect ~1 MP bucket at 1024 px, else the square (the
    reference's 512-px stage trains on 512² only)."""
    if resolution != 1024:
        return resolution, resolution
    return nearest_bucket(width, height)


def fit(image: Image.Image, size_hw: tuple[int, int]) -> np.ndarray:
    """Resize to cover the bucket, centre-crop; returns float32 (3, H, W) in [-1, 1] as the VAE expects."""
    h, w = size_hw
    scale = max(h / image.height, w / image.width)
    image = image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)),
                                        Image.Resampling.BICUBIC)
    left, top = (image.width - w) // 2, (image.height - h) // 2
    array = np.asarray(image.crop((left, top, left + w, top + h)), dtype=np.float32)
    return array.transpose(2, 0, 1) / 127.5 - 1


def to_uint8(array: np.ndarray) -> np.ndarray:
    """`fit`'s inverse: float (3, H, W) in [-1, 1] → RGB uint8 (H, W, 3)."""
    return ((array.transpose(1, 2, 0) + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


class PairDataset:
    """Map-style dataset over an index; item = (source, target, instruction_en, task_id)."""

    def __init__(self, pairs: list[PairRef], resolution: int):
        self.pairs, self.resolution = pairs, resolution
        self._groups: list[list[int]] | None = None  # per pair: the indices of its (task, bucket) group
        self._positions: list[int] = []  # per pair: its place in that list

    def __len__(self) -> int:
        return len(self.pairs)

    def task_ids(self) -> list[int]:
        return [p.task_id for p in self.pairs]

    def buckets(self) -> list[tuple[int, int]]:
        """The aspect bucket of each pair: batches are drawn within one, so their images share a size."""
        return [bucket_for(*p.size, self.resolution) for p in self.pairs]

    def _load(self, index: int) -> dict:
        ref = self.pairs[index]
        # unbuffered: each member is one ranged read (one request on an object store), not a buffer's worth
        with store_path(ref.shard).open() as file:
            source, target = (Image.fromarray(decode_image(_member(file, where), max_pixels=MAX_PIXELS))
                              for where in (ref.source, ref.target))
        size = bucket_for(target.width, target.height, self.resolution)
        return {"source": fit(source, size), "target": fit(target, size),
                "instruction": ref.instruction_en or ref.instruction_zh, "task_id": ref.task_id, "key": ref.key}

    def __getitem__(self, index: int) -> dict:
        """The pair, or when it does not decode the next readable pair of its task and bucket (the sampler
        drew the group; a substitute keeps the batch's shape), with the keys passed over in `skipped`."""
        if self._groups is None:  # built on first use, in each loader worker
            groups: dict[tuple[int, tuple[int, int]], list[int]] = {}
            self._groups, self._positions = [], []
            for i, key in enumerate(zip(self.task_ids(), self.buckets())):
                members = groups.setdefault(key, [])
                self._groups.append(members)
                self._positions.append(len(members))
                members.append(i)
        group, start = self._groups[index], self._positions[index]
        skipped = []
        for candidate in group[start:] + group[:start]:
            try:
                return {**self._load(candidate), "skipped": skipped}
            except Rejected as e:
                skipped.append(f"{self.pairs[candidate].key}: {e.reason}")
        raise RuntimeError(f"no pair of task {self.pairs[index].task_id} in its aspect bucket decodes: {skipped}")
