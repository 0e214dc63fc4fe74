"""Training data: editing pairs from corpus shards and reference-format X2Edit shards, by random access.

An index of every pair (shard, member offsets, task id) is built once by walking the tar headers and reading
only the json members, so the P×K sampler can pick pairs by task and a run can resume at an exact position.
Two layouts are read:
  - this project's corpus: `<key>.src.jpg`, `<key>.edited.jpg`, `<key>.json` (instruction_en/zh, task_id);
  - the X2Edit release: source `1.0.jpg` (also `.1.0.jpg`, `.1.jpg`, `1.jpg`, as the reference's
    `verify_keys` accepts), target `2.jpg` (or `.2.jpg`), json with `task`/`label` in Chinese or English
    and `instruction`/`instruction_en`/`instruction_zh`; labels map through the one taxonomy.
Images are resized and centre-cropped to an aspect bucket: 512² at 512 px, the reference's 13 ~1 MP
buckets at 1024 px.
"""
from __future__ import annotations

import glob
import io
import json
import tarfile
from dataclasses import dataclass

import numpy as np
from PIL import Image

from manifests.buckets import nearest_bucket
from manifests.taxonomy import task_for_label

SOURCE_FIELDS = ("src.jpg", "1.0.jpg", ".1.0.jpg", ".1.jpg", "1.jpg")
TARGET_FIELDS = ("edited.jpg", "2.jpg", ".2.jpg")


@dataclass(frozen=True)
class PairRef:
    shard: str
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


def _record(meta: dict) -> tuple[int, str, str]:
    """(task id, English, Chinese instruction) from a corpus or reference-format json."""
    task = meta["task_id"] if isinstance(meta.get("task_id"), int) else task_for_label(meta.get("task") or meta.get("label")).id
    en, zh = meta.get("instruction_en") or "", meta.get("instruction_zh") or ""
    plain = meta.get("instruction") or ""  # the reference writes English or Chinese here, by script
    if plain and plain.isascii() and not en:
        en = plain
    elif plain and not plain.isascii() and not zh:
        zh = plain
    return task, en, zh


def index_shards(patterns: list[str]) -> list[PairRef]:
    """Every pair with a source, a target and a json in the matching tars, in a stable order."""
    shards = sorted({p for pattern in patterns for p in glob.glob(pattern)})
    if not shards:
        raise FileNotFoundError(f"no training shards match {patterns}")
    pairs = []
    for shard in shards:
        members: dict[str, dict[str, tuple[int, int]]] = {}
        metas: dict[str, dict] = {}
        with tarfile.open(shard, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, field = _split(info.name)
                members.setdefault(key, {})[field] = (info.offset_data, info.size)
                if field == "json":
                    metas[key] = json.loads(tar.extractfile(info).read())
        for key, fields in members.items():
            src = next((fields[f] for f in SOURCE_FIELDS if f in fields), None)
            tgt = next((fields[f] for f in TARGET_FIELDS if f in fields), None)
            if src and tgt and key in metas:
                task, en, zh = _record(metas[key])
                pairs.append(PairRef(shard, key, task, en, zh, src, tgt, _image_size(shard, tgt)))
    return pairs


def _image_size(shard: str, where: tuple[int, int]) -> tuple[int, int]:
    """Width and height from the image header: the first 64 KiB hold it for any JPEG/PNG we write."""
    with open(shard, "rb") as f:
        f.seek(where[0])
        head = f.read(min(where[1], 1 << 16))
    try:
        return Image.open(io.BytesIO(head)).size
    except OSError:  # an unusually long header (big EXIF block): read the whole member
        with open(shard, "rb") as f:
            f.seek(where[0])
            return Image.open(io.BytesIO(f.read(where[1]))).size


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


class PairDataset:
    """Map-style dataset over an index; item = (source, target, instruction_en, task_id)."""

    def __init__(self, pairs: list[PairRef], resolution: int):
        self.pairs, self.resolution = pairs, resolution

    def __len__(self) -> int:
        return len(self.pairs)

    def task_ids(self) -> list[int]:
        return [p.task_id for p in self.pairs]

    def buckets(self) -> list[tuple[int, int]]:
        """The aspect bucket of each pair: batches are drawn within one, so their images share a size."""
        return [bucket_for(*p.size, self.resolution) for p in self.pairs]

    def _read(self, shard: str, where: tuple[int, int]) -> Image.Image:
        with open(shard, "rb") as f:
            f.seek(where[0])
            return Image.open(io.BytesIO(f.read(where[1])))

    def __getitem__(self, index: int) -> dict:
        ref = self.pairs[index]
        source, target = self._read(ref.shard, ref.source), self._read(ref.shard, ref.target)
        size = bucket_for(target.width, target.height, self.resolution)
        return {"source": fit(source, size), "target": fit(target, size),
                "instruction": ref.instruction_en or ref.instruction_zh, "task_id": ref.task_id, "key": ref.key}
