"""Corpus shards: WebDataset tars plus one Parquet manifest per tar, the manifest being the commit marker.

Tars are written byte-for-byte deterministically (sorted members, fixed mtime/owner/mode), so the same
pairs always give the same shard checksum, whichever process or run wrote them.
"""
from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from manifests.commit import atomic_write_bytes, atomic_write_parquet
from manifests.storage import StorePath, parquet_schema, read_parquet, store_path

MANIFEST_SCHEMA = pa.schema([
    ("pair_id", pa.string()),
    ("shard", pa.string()),
    ("sample_id", pa.string()),
    ("source_uri", pa.string()),
    ("task", pa.string()),
    ("task_id", pa.int32()),
    ("task_zh", pa.string()),
    ("op", pa.string()),
    ("editor", pa.string()),
    ("instruction_en", pa.string()),
    ("instruction_zh", pa.string()),
    ("seed", pa.int64()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("region_mask", pa.bool_()),  # mask.png marks the edited region (else the whole image: a global edit)
    ("members", pa.list_(pa.string())),
    ("member_sha256", pa.list_(pa.string())),
    ("scores", pa.string()),  # JSON; also flattened into score_* columns by the pack stage
    ("recipe_hash", pa.string()),
])


# A pair's `<key>.json` has the same fields, of the same types, in every record of every corpus: stock readers
# (HF `datasets`, Ray Data) infer one schema from the first few records and refuse any record that differs.
# Its open-ended mappings (per-op parameters, per-task scores, user sidecars, …) are therefore JSON text.
RECORD_JSON_FIELDS = ("params", "scores", "thresholds", "subject", "provenance", "source_meta")


def decode_record(record: dict) -> dict:
    """A pair record (or a ledger row) with its JSON-text fields parsed."""
    return {k: json.loads(v) if k in RECORD_JSON_FIELDS and isinstance(v, str) else v for k, v in record.items()}


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}"


BLOCK, RECORD = 512, 10240  # a tar block; the record an archive is padded to (tarfile's RECORDSIZE)
_MTIME = b"0" * 11 + b"\0"
# A member's ustar header after its checksum field: type regular file, no link, the ustar magic, empty owner
# names and device fields, no name prefix (names of up to 100 bytes fit the name field).
_HEADER_TAIL = b"0" + bytes(100) + b"ustar\x0000" + bytes(32 + 32 + 8 + 8 + 155 + 12)
_TAIL_SUM = sum(_HEADER_TAIL) + 8 * ord(" ")  # the checksum counts its own field as eight spaces


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A ustar archive of `members` in their order, each file mode 0444, uid/gid 0, mtime 0: the bytes
    Python's tarfile writes for them (tests/test_contract.py checks it), without its per-member objects,
    which cost a third of the pack's time."""
    parts = []
    for name, data in members:
        encoded = name.encode()
        if len(encoded) > 100 or len(data) >= 8 ** 11:
            raise ValueError(f"tar member {name!r}: a ustar name holds 100 bytes and a size 11 octal digits")
        # name, mode, uid, gid, size, mtime: octal numbers of their field's width less one, each ended by NUL
        head = encoded.ljust(100, b"\0") + b"0000444\0" + b"0000000\0" * 2 + b"%011o\0" % len(data) + _MTIME
        parts += [head, b"%06o\0 " % (sum(head) + _TAIL_SUM), _HEADER_TAIL, data, bytes(-len(data) % BLOCK)]
    body = b"".join(parts) + bytes(2 * BLOCK)  # the end-of-archive marker
    return body + bytes(-len(body) % RECORD)


def write_shard(out_dir: Path | StorePath, name: str, members: list[tuple[str, bytes]], manifest: pa.Table,
                meta: dict) -> dict:
    """Write `<name>.tar` then `<name>.parquet` (the commit marker, in an object store too); returns the shard's
    summary."""
    data = tar_bytes(members)
    summary = {"shard": name, "pairs": manifest.num_rows, "bytes": len(data),
               "sha256": hashlib.sha256(data).hexdigest(), **meta}
    out = store_path(out_dir)
    atomic_write_bytes(out / f"{name}.tar", data)
    table = manifest.replace_schema_metadata({b"x2edit": json.dumps(summary).encode()})
    atomic_write_parquet(out / f"{name}.parquet", table)
    return summary


def shard_summary(manifest_path: Path | StorePath) -> dict:
    return summary_of(parquet_schema(store_path(manifest_path)))


def summary_of(manifest_schema: pa.Schema) -> dict:
    """The shard summary a manifest carries in its schema's metadata (KeyError when it has none)."""
    return json.loads((manifest_schema.metadata or {})[b"x2edit"])


def committed_shards(out_dir: Path | StorePath, prefix: str) -> dict[str, dict]:
    """Shards whose manifest exists, by name; a tar without its manifest is not part of the corpus."""
    return {p.stem: shard_summary(p) for p in store_path(out_dir).glob(f"{prefix}-*.parquet")}


def discard_orphan_tars(out_dir: Path | StorePath, prefix: str) -> list[StorePath]:
    """Delete the tars a killed pack left without their manifest (one listing, also in an object store)."""
    entries = store_path(out_dir).glob(f"{prefix}-*")
    manifests = {p.stem for p in entries if p.suffix == ".parquet"}
    orphans = [p for p in entries if p.suffix == ".tar" and p.stem not in manifests]
    for p in orphans:
        p.unlink()
    return orphans


def iter_shard(path: Path | StorePath) -> Iterator[dict]:
    """Samples of one corpus shard as {"__key__": key, "<field>": bytes}; members are adjacent by key."""
    sample: dict = {}
    with store_path(path).open() as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for info in tar:
            key, _, field = info.name.partition(".")
            if sample and sample["__key__"] != key:
                yield sample
                sample = {}
            sample["__key__"] = key
            sample[field] = tar.extractfile(info).read()
    if sample:
        yield sample


def read_manifests(out_dir: Path | StorePath, prefix: str) -> pa.Table:
    paths = store_path(out_dir).glob(f"{prefix}-*.parquet")
    if not paths:
        return MANIFEST_SCHEMA.empty_table()
    return pa.concat_tables([read_parquet(p) for p in paths], promote_options="default")
