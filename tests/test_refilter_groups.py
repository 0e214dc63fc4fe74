"""Refilter's re-decision, without Ray: a group of fragments re-decided into one fragment (resumable by its
name), images carried over untouched, the thumbnail of a pair it rejects made by the reader that shows it, and
the table-wide re-decision against its one-row reference."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench.scale import TIGHT_POLICY, synthesise
from manifests.fragments import list_fragments, read_units
from manifests.inspect import Run, ended_rows
from manifests.schema import LIVE, REJECTED, ROW_SCHEMA
from pipeline.refilter import _merged_recipe, redecide, redecide_group, redecide_table
from pipeline.stage_state import stage_dir
from stages.score import ABSENT_KEY

IMAGES = ("src", "edited", "mask", "thumb")


def test_a_group_is_redecided_into_one_fragment_with_its_images(tmp_path):
    synthesise(tmp_path / "run", 400, fragment_rows=64)
    (tmp_path / "tight.yaml").write_text(json.dumps(TIGHT_POLICY))
    recipe = _merged_recipe(tmp_path / "run", str(tmp_path / "tight.yaml"), tmp_path / "out")
    paths = list_fragments(stage_dir(tmp_path / "run", "score"))
    out = stage_dir(tmp_path / "out", "score")
    out.mkdir(parents=True)
    batch = pa.table({"group": [0], "paths": [[str(p) for p in paths]]})
    decisions = redecide_group(batch, str(out), recipe)
    written = list_fragments(out)
    assert len(written) == 1
    mtime = Path(written[0]).stat().st_mtime_ns
    # a resumed refilter: the group is committed already, and its decisions come back the same
    assert redecide_group(batch, str(out), recipe).equals(decisions)
    assert list_fragments(out) == written and Path(written[0]).stat().st_mtime_ns == mtime

    before = read_units(stage_dir(tmp_path / "run", "score"))
    after = read_units(out)
    assert after["unit_id"].to_pylist() == before["unit_id"].to_pylist()
    for column in ("src", "edited", "mask", "thumb"):
        assert after[column].equals(before[column])
    newly = pc.and_(pc.equal(before["status"], LIVE), pc.equal(after["status"], REJECTED))
    rejected = after.filter(newly)
    assert len(rejected) and set(rejected["reason"].to_pylist()) == {"no_op_edit"}
    assert all(json.loads(s)["change_global"] < 0.05 for s in rejected["scores"].to_pylist())
    assert rejected["thumb"].null_count == len(rejected)  # none made here: a report makes the few it shows

    run = Run(tmp_path / "out", "x2edit")
    unit = rejected["unit_id"][0].as_py()
    shown = ended_rows(run, [unit], ["thumb", "instruction_zh"])[unit]
    assert shown["thumb"][:2] == b"\xff\xd8" and set(shown) == {"unit_id", "thumb", "instruction_zh"}
    assert pq.read_metadata(written[0]).num_rows == before.num_rows
    # the decisions the diff reads: each row's before and after, in the group's row order
    assert decisions["unit_id"].equals(pq.read_table(written[0])["unit_id"])
    assert decisions["accepted"].to_pylist() == [s == LIVE for s in pq.read_table(written[0])["status"].to_pylist()]
    assert decisions["accepted_before"].to_pylist() == [
        s == LIVE for p in paths for s in pq.read_table(p)["status"].to_pylist()]


def test_the_table_redecision_agrees_with_the_row_reference(tmp_path):
    """redecide_table (Arrow columns, Python only per judged row's scores) against redecide, one dict per row,
    on rows of every kind: accepted, rejected by the policy (images kept), ended earlier, a score absent with
    the scorer's reason, a score never computed, and a task with its own any_of rule."""
    synthesise(tmp_path / "run", 600, fragment_rows=600)
    rows = read_units(stage_dir(tmp_path / "run", "score")).drop_columns(["_fragment", "_row"]).to_pylist()
    for i, row in enumerate(rows):
        scores = json.loads(row["scores"] or "{}")
        if i % 7 == 0 and "aesthetic" in scores:  # the judge could not give it, and said why
            del scores["aesthetic"]
            absent = {"aesthetic": {"scorer": "judge", "reason": "vlm_truncated", "message": "ran to 64 tokens"}}
            row["provenance"] = json.dumps({**json.loads(row["provenance"]), ABSENT_KEY: absent})
        elif i % 11 == 0:
            scores.pop("clip_t", None)  # never computed: missing_score
        row["scores"] = json.dumps(scores)
    table = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
    policy = {"name": "mixed", "score": {
        "rules": [{"score": "change_global", "min": 0.05, "reason": "no_op_edit"},
                  {"score": "aesthetic", "min": 0.2, "reason": "low_aesthetic"},
                  {"score": "clip_t", "min": 0.1, "reason": "off_instruction"}],
        "per_task": {"color_change": [{"any_of": [{"score": "change_inside", "min": 0.5},
                                                  {"score": "change_global", "max": 0.3}],
                                       "reason": "colour_unchanged"}]}}}
    (tmp_path / "mixed.yaml").write_text(json.dumps(policy))
    recipe = _merged_recipe(tmp_path / "run", str(tmp_path / "mixed.yaml"), tmp_path / "out")

    fast = redecide_table(table, recipe)
    light = table.drop_columns(list(IMAGES))
    kept = pc.is_valid(table["src"]).to_pylist()
    naive = [redecide(row, recipe, images) for row, images in zip(light.to_pylist(), kept)]
    assert fast.drop_columns(list(IMAGES)).to_pylist() == naive
    assert fast.select(list(IMAGES)).equals(table.select(list(IMAGES))) and fast.schema == table.schema
    reasons = {r["reason"] for r in naive if r["stage"] == "score"}
    assert {"no_op_edit", "low_aesthetic", "vlm_truncated", "missing_score", "colour_unchanged"} <= reasons
    assert sum(r["status"] == LIVE for r in naive) > 0
