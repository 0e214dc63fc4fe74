"""Refilter's re-decision, without Ray: a group of fragments re-decided into one fragment (resumable by its
name), images carried over untouched, and the thumbnail of a pair it rejects made by the reader that shows it."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench.scale import TIGHT_POLICY, synthesise
from manifests.fragments import list_fragments, read_units
from manifests.inspect import Run, ended_rows
from manifests.schema import LIVE, REJECTED
from pipeline.refilter import _merged_recipe, redecide_group
from pipeline.stage_state import stage_dir


def test_a_group_is_redecided_into_one_fragment_with_its_images(tmp_path):
    synthesise(tmp_path / "run", 400, fragment_rows=64)
    (tmp_path / "tight.yaml").write_text(json.dumps(TIGHT_POLICY))
    recipe = _merged_recipe(tmp_path / "run", str(tmp_path / "tight.yaml"), tmp_path / "out")
    paths = list_fragments(stage_dir(tmp_path / "run", "score"))
    out = stage_dir(tmp_path / "out", "score")
    out.mkdir(parents=True)
    batch = pa.table({"paths": [[str(p) for p in paths]]})
    redecide_group(batch, str(out), recipe)
    written = list_fragments(out)
    assert len(written) == 1
    mtime = Path(written[0]).stat().st_mtime_ns
    redecide_group(batch, str(out), recipe)  # a resumed refilter: the group is committed already
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
