"""The trainer's reader: corpus shards and reference-format X2Edit shards, by random access."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from manifests.shards import tar_bytes
from trainer.data import PairDataset, bucket_for, index_shards


def _jpeg(w: int, h: int, value: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (w, h), (value, 255 - value, 0)).save(out, "JPEG")
    return out.getvalue()


def test_reads_corpus_and_reference_layouts(tmp_path):
    corpus = [("pair-a.json", json.dumps({"task_id": 3, "instruction_en": "Make it an oil painting.",
                                          "instruction_zh": "油画"}).encode()),
              ("pair-a.src.jpg", _jpeg(64, 48, 10)), ("pair-a.edited.jpg", _jpeg(64, 48, 200))]
    (tmp_path / "x2edit-000000.tar").write_bytes(tar_bytes(corpus))
    reference = [("000000001.1.0.jpg", _jpeg(80, 40, 30)), ("000000001.2.jpg", _jpeg(80, 40, 90)),
                 ("000000001.json", json.dumps({"task": "删除主体", "instruction": "删除左边的狗"}).encode()),
                 ("000000002..1.jpg", _jpeg(40, 80, 50)), ("000000002..2.jpg", _jpeg(40, 80, 60)),
                 ("000000002.json", json.dumps({"task": "Camera Move Editing", "instruction": "Zoom in"}).encode()),
                 ("000000003.1.0.jpg", _jpeg(40, 40, 70)),  # no target: not a pair
                 ("000000003.json", b"{}")]
    (tmp_path / "ref-00000.tar").write_bytes(tar_bytes(reference))
    pairs = index_shards([str(tmp_path / "*.tar")])
    assert [(p.key, p.task_id) for p in pairs] == [("000000001", 1), ("000000002", 12), ("pair-a", 3)]
    assert pairs[0].instruction_zh == "删除左边的狗" and pairs[1].instruction_en == "Zoom in"
    data = PairDataset(pairs, resolution=32)
    item = data[2]
    assert item["source"].shape == item["target"].shape == (3, 32, 32)
    assert item["source"].dtype == np.float32 and -1 <= item["source"].min() and item["target"].max() <= 1
    assert item["instruction"] == "Make it an oil painting." and item["task_id"] == 3
    assert data.task_ids() == [1, 12, 3]
    assert [p.size for p in pairs] == [(80, 40), (40, 80), (64, 48)]
    assert PairDataset(pairs, 1024).buckets() == [(720, 1456), (1456, 720), (880, 1184)]


def test_buckets():
    assert bucket_for(900, 600, 512) == (512, 512)
    assert bucket_for(1000, 1000, 1024) == (1024, 1024)
    assert bucket_for(1600, 900, 1024) == (752, 1392)  # wide images get a wide bucket
    assert bucket_for(900, 1600, 1024) == (1392, 752)


def test_hold_out_is_per_task_disjoint_and_independent_of_order(tmp_path):
    pytest.importorskip("torch")
    from trainer.tiny_flux import write_random_corpus
    from trainer.validate import hold_out

    pairs = index_shards([str(write_random_corpus(tmp_path / "c.tar"))])  # 12 pairs, 4 of each of 3 tasks
    kept, held = hold_out(pairs, per_task=1, keep=2)
    assert sorted(p.task_id for p in held) == [3, 11, 12] and len(kept) == 9
    assert {p.key for p in kept} | {p.key for p in held} == {p.key for p in pairs}
    assert {p.key for p in hold_out(pairs[::-1], per_task=1, keep=2)[1]} == {p.key for p in held}
    assert hold_out(pairs, per_task=3, keep=2) == (pairs, [])  # no task can spare 3 and keep 2


def test_a_hostile_shard_is_read_safely_and_its_bad_pairs_counted(tmp_path):
    """Bad json, a non-image, a bomb header, a zero-byte member: left out of the index, counted by reason; a
    pair that passes the header check but does not decode is replaced by a readable pair of its group."""
    from collections import Counter

    from tests.badinputs import bomb_png, good_jpeg

    def pair(key: str, task: int, src: bytes, edited: bytes, meta: bytes | None = None) -> list[tuple[str, bytes]]:
        meta = meta if meta is not None else json.dumps({"task_id": task, "instruction_en": key}).encode()
        return [(f"{key}.json", meta), (f"{key}.src.jpg", src), (f"{key}.edited.jpg", edited)]

    good = _jpeg(64, 48, 10)
    detailed = good_jpeg(256, 192, 1)
    truncated = detailed[:len(detailed) * 2 // 3]  # the header is intact, the scan is cut: found when decoded
    members = (pair("a-good", 3, good, _jpeg(64, 48, 200)) + pair("b-truncated", 3, truncated, good)
               + pair("c-json", 3, good, good, b"{not json") + pair("d-list", 3, good, good, b"[1, 2]")
               + pair("e-text", 3, b"this is not an image", good) + pair("f-bomb", 3, good, bomb_png())
               + pair("g-empty", 3, b"", good) + pair("h-other-task", 5, good, good))
    (tmp_path / "hostile.tar").write_bytes(tar_bytes(members))

    left_out = Counter()
    pairs = index_shards([str(tmp_path / "*.tar")], left_out)
    assert [p.key for p in pairs] == ["a-good", "b-truncated", "h-other-task"]
    assert left_out == {"bad_json": 2, "not_an_image": 2, "too_many_pixels": 1}
    data = PairDataset(pairs, resolution=32)
    item = data[1]  # b-truncated: its group's other pair comes instead, and the batch records why
    assert item["key"] == "a-good" and item["skipped"] == ["b-truncated: truncated_image"]
    assert data[0]["skipped"] == [] and data[2]["key"] == "h-other-task"
