"""The data contract: taxonomy, mixing, fragments and resume bookkeeping, shards, recipes, policies."""
from __future__ import annotations

import io
import random
import tarfile
from collections import Counter

import pyarrow as pa
import pytest
import webdataset as wds

from filters.policy import Rule, decide, rules_for
from manifests.commit import discard_uncommitted
from manifests.fragments import done_ids, read_units, write_fragment
from manifests.mix import interleave, smooth_wrr
from manifests.schema import LIVE, ROW_SCHEMA, empty_row, make_pair_id
from manifests.shards import committed_shards, discard_orphan_tars, iter_shard, tar_bytes, write_shard, MANIFEST_SCHEMA
from manifests.taxonomy import NUM_TASK_IDS, TASKS, task_by_name, task_for_label
from pipeline.recipe import RecipeError, load_recipe, parse_recipe


def test_taxonomy_matches_reference_ids_and_aliases():
    assert [t.id for t in TASKS] == list(range(NUM_TASK_IDS))
    assert len({t.name for t in TASKS}) == NUM_TASK_IDS
    # labels as they appear in reference-format shards (reference-code.md §2)
    assert task_for_label("删除主体").id == 1 and task_for_label("ObjectRemoval").id == 1
    assert task_for_label("Camera Move Editing").id == 12 and task_for_label("相机移动").id == 12
    assert task_for_label("style transfer").id == 15 and task_for_label("tone_transfer").id == 11
    assert task_for_label(" TEXT CHANGE ").id == 10
    assert task_for_label("主题生成").id == 0 and task_for_label("never heard of it").id == 0
    assert task_for_label(None).id == 0
    with pytest.raises(ValueError, match="known tasks"):
        task_by_name("删除主体")  # recipes use canonical names only


def test_smooth_wrr_follows_weights_in_every_window():
    seq = smooth_wrr({"a": 2, "b": 1, "c": 1}, 400)
    assert Counter(seq) == {"a": 200, "b": 100, "c": 100}
    for start in range(0, 380, 7):  # any window of 20 is within one pick of the target
        window = Counter(seq[start:start + 20])
        assert abs(window["a"] - 10) <= 1 and abs(window["b"] - 5) <= 1
    groups = {"x": list(range(6)), "y": list(range(10, 13))}
    mixed = interleave(groups)
    assert sorted(mixed) == sorted(groups["x"] + groups["y"]) and mixed[:3].count(10) <= 1


def _rows(sample: str, units: list[str], fanout: int) -> pa.Table:
    rows = []
    for u in units:
        row = empty_row()
        row.update(unit_id=u, sample_id=sample, fanout=fanout, status=LIVE)
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def test_done_ids_needs_every_fanned_out_row(tmp_path):
    write_fragment(tmp_path, _rows("s1", ["s1-a", "s1-b"], 2))
    write_fragment(tmp_path, _rows("s2", ["s2-a"], 3))  # 1 of 3 committed before a kill
    done = done_ids(tmp_path)
    assert {"s1", "s1-a", "s1-b", "s2-a"} <= done and "s2" not in done
    # the rerun recomputes s2 in full: the duplicate row of s2-a is dropped when reading
    write_fragment(tmp_path, _rows("s2", ["s2-a", "s2-b", "s2-c"], 3))
    table = read_units(tmp_path)
    assert sorted(table.column("unit_id").to_pylist()) == ["s1-a", "s1-b", "s2-a", "s2-b", "s2-c"]
    assert "s2" in done_ids(tmp_path)


def test_uncommitted_leftovers_are_discarded(tmp_path):
    write_fragment(tmp_path, _rows("s1", ["s1-a"], 1))
    (tmp_path / ".frag-x.parquet.tmp-123").write_bytes(b"half a file")
    assert len(discard_uncommitted(tmp_path)) == 1
    assert [p.name.startswith("frag-") for p in tmp_path.iterdir()] == [True]


def _tarfile_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """The reference: Python's tarfile, with the fixed metadata tar_bytes writes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_the_tar_writer_writes_what_tarfile_writes():
    rng = random.Random(0)
    sizes = [0, 1, 511, 512, 513, 10239, 10240, 70001]
    members = [(f"{'k' * rng.randrange(1, 60)}-{i}.{ext}", rng.randbytes(size))
               for i, size in enumerate(sizes) for ext in ("json", "src.jpg")]
    members.append(("ü" * 50, b"x"))  # 100 bytes of UTF-8: the longest name
    for n in range(len(members) + 1):
        assert tar_bytes(members[:n]) == _tarfile_bytes(members[:n])
    with pytest.raises(ValueError, match="100 bytes"):
        tar_bytes([("k" * 101, b"")])


def test_shards_are_deterministic_and_commit_with_their_manifest(tmp_path):
    members = [("k1.json", b"{}"), ("k1.src.jpg", b"a"), ("k1.edited.jpg", b"b"), ("k2.json", b"{}")]
    assert tar_bytes(members) == tar_bytes(members)
    manifest = MANIFEST_SCHEMA.empty_table()
    summary = write_shard(tmp_path, "c-000000", members, manifest, {"plan_hash": "h"})
    assert committed_shards(tmp_path, "c") == {"c-000000": summary}
    (tmp_path / "c-000001.tar").write_bytes(tar_bytes(members))  # killed before its manifest
    assert [p.name for p in discard_orphan_tars(tmp_path, "c")] == ["c-000001.tar"]
    keys = [s["__key__"] for s in iter_shard(tmp_path / "c-000000.tar")]
    assert keys == ["k1", "k2"]
    # the webdataset library reads the multi-extension fields of a sample
    sample = next(iter(wds.WebDataset(str(tmp_path / "c-000000.tar"), shardshuffle=False)))
    assert sample["__key__"] == "k1" and sample["src.jpg"] == b"a" and sample["edited.jpg"] == b"b"
    with tarfile.open(tmp_path / "c-000000.tar") as tar:
        assert all(m.mtime == 0 and m.uid == 0 for m in tar.getmembers())


def test_pair_ids_are_deterministic_and_dot_free():
    a = make_pair_id("sample-1", "style_change", 7, "classical:style.oil")
    assert a == make_pair_id("sample-1", "style_change", 7, "classical:style.oil")
    assert a != make_pair_id("sample-1", "style_change", 8, "classical:style.oil")
    assert "." not in a and a.startswith("style_change-")


def test_recipe_errors_name_the_key_and_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ninstruct:\n  tasks_per_sorce: 3\nsource:\n  min_side: -4\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(str(bad))
    text = str(err.value)
    assert f"{bad}: instruct.tasks_per_sorce: Extra inputs are not permitted" in text
    assert f"{bad}: source.min_side:" in text and "-4" in text
    with pytest.raises(RecipeError, match="target_mix"):
        parse_recipe({"name": "x", "instruct": {"target_mix": {"no_such_task": 1}}}, "r.yaml")
    with pytest.raises(RecipeError, match="input: Value error, input.paths is required"):
        parse_recipe({"name": "x", "input": {"kind": "webdataset"}}, "r.yaml")
    with pytest.raises(RecipeError, match="not found"):
        load_recipe("no-such-recipe")
    shipped = load_recipe("default-cpu")
    assert shipped.hash() == load_recipe("default-cpu").hash()
    assert shipped.hash() != parse_recipe({**shipped.model_dump(), "seed": 1}).hash()


def test_policy_rules_per_task_replace_common_ones():
    common = [Rule(score="change_global", min=0.01, reason="no_op_edit")]
    per_task = {"background_change": [Rule(score="change_global", min=0.1, reason="weak")]}
    assert decide({"change_global": 0.05}, rules_for("style_change", common, per_task)) == (None, "")
    reason, message = decide({"change_global": 0.05}, rules_for("background_change", common, per_task))
    assert reason == "weak" and "change_global=0.0500" in message
    assert decide({}, common)[0] == "missing_score"


def test_colocated_stages_must_be_consecutive():
    assert parse_recipe({"name": "x", "resources": {"colocate": ["edit", "score"]}}).resources.colocate == ["edit", "score"]
    for bad in (["instruct", "score"], ["score", "edit"], ["edit"], ["source", "instruct"]):
        with pytest.raises(RecipeError, match="colocate takes two or more consecutive stages"):
            parse_recipe({"name": "x", "resources": {"colocate": bad}}, "r.yaml")
