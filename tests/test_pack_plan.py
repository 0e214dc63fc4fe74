"""The pack plan and its reads, without Ray: the plan is a pure function of the rows (not of how they were
batched into fragments), every shard carries its window's task mix, and packing reads each committed row
group about once."""
from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.scale import synthesise
from manifests.fragments import fragment_path, list_fragments, read_units, write_fragment
from manifests import fragments
from manifests import ledger as ledger_module
from manifests.ledger import LEDGER_NAME, build_ledger, ledger_plan, read_ledger, write_ledger
from manifests.schema import ACCEPTED, LIVE, ROW_SCHEMA
from manifests.shards import iter_shard
from pipeline.stage_state import stage_dir
from stages import pack
from stages.base import StageContext
from stages.pack import PLAN_COLUMNS, PackConfig, PackStage, RowReader, plan_shards

CFG = PackConfig(prefix="t", shard_size=10)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished score stage of 1,500 units in 64-row fragments (the recipe default)."""
    run_dir = tmp_path_factory.mktemp("run")
    synthesise(run_dir, 1500, fragment_rows=64)
    return run_dir


def _plan(run_dir, monkeypatch):
    monkeypatch.setattr(pack, "WINDOW_PAIRS", 300)  # 30 shards a window: a small run has several
    return plan_shards(read_units(stage_dir(run_dir, "score"), columns=list(PLAN_COLUMNS)), CFG)


def _shards(plan) -> list[tuple[str, str, list[str]]]:
    units = plan.order.column("unit_id").to_pylist()
    return [(s["shard"], s["plan_hash"], units[s["start"]:s["stop"]]) for s in plan.shards]


def test_the_plan_does_not_depend_on_the_fragment_layout(run, tmp_path, monkeypatch):
    rows = pa.concat_tables(pq.read_table(p) for p in list_fragments(stage_dir(run, "score")))
    shuffled = rows.take(np.random.default_rng(1).permutation(rows.num_rows))
    other = stage_dir(tmp_path, "score")
    other.mkdir(parents=True)
    for start in range(0, rows.num_rows, 37):  # other batches, other row order: what a per-stage run commits
        write_fragment(other, shuffled.slice(start, 37))
    write_fragment(other, shuffled.slice(0, 5))  # a retried batch: the same units committed twice
    first, second = _plan(run, monkeypatch), _plan(tmp_path, monkeypatch)
    assert _shards(first) == _shards(second)
    live = rows.filter(pa.compute.equal(rows["status"], LIVE))["unit_id"].to_pylist()
    assert sorted(first.order["unit_id"].to_pylist()) == sorted(live)
    sizes = [s["stop"] - s["start"] for s in first.shards]
    assert set(sizes[:-1]) == {CFG.shard_size} and 0 < sizes[-1] <= CFG.shard_size


def test_each_shard_carries_its_windows_task_mix(run, monkeypatch):
    plan = _plan(run, monkeypatch)
    rows = read_units(stage_dir(run, "score"), columns=["unit_id", "task"])
    task = dict(zip(rows["unit_id"].to_pylist(), rows["task"].to_pylist()))
    units = plan.order["unit_id"].to_pylist()
    for window in {s["window"] for s in plan.shards}:
        shards = [s for s in plan.shards if s["window"] == window]
        mix = Counter(task[u] for u in units[shards[0]["start"]:shards[-1]["stop"]])
        total = sum(mix.values())
        for s in shards:
            counts = Counter(task[u] for u in units[s["start"]:s["stop"]])
            size = s["stop"] - s["start"]
            assert all(abs(counts[t] - size * n / total) < 2 for t, n in mix.items()), (s["shard"], counts)


def test_packing_reads_each_row_group_about_once(run, tmp_path, monkeypatch):
    reads = []
    read_row_group = pq.ParquetFile.read_row_group

    def counted(self, group, *args, **kwargs):
        reads.append(group)
        return read_row_group(self, group, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counted)
    plan = _plan(run, monkeypatch)
    rows_dir = stage_dir(run, "score")
    stage = PackStage(CFG, StageContext(seed=0, recipe_hash="test", run_dir=str(run)), str(rows_dir), str(tmp_path))
    read = 0
    for job in plan.jobs(skip=set()).to_pylist():
        reader = RowReader(rows_dir, job["_fragment"], job["_row"])
        stage.write_job(job, reader)
        read += reader.bytes_read
    committed = sum(p.size() for p in list_fragments(rows_dir))
    groups = sum(pq.read_metadata(p).num_row_groups for p in list_fragments(rows_dir))
    assert read <= 1.25 * committed  # the old plan read each fragment once per shard that took a row of it
    assert len(reads) <= 1.25 * groups
    packed = [s["__key__"] for p in sorted(tmp_path.glob("t-*.tar")) for s in iter_shard(p)]
    assert packed == plan.order["unit_id"].to_pylist()


def test_shards_are_the_same_bytes_whichever_job_writes_them(run, tmp_path, monkeypatch):
    plan = _plan(run, monkeypatch)
    rows_dir = stage_dir(run, "score")
    jobs = plan.jobs(skip={"t-000001"}).to_pylist()  # committed already: a resumed run skips it
    one_shard_each = [one for job in jobs for one in _split(job)][::-1]  # as other actors, in another order
    digests = []
    for out, todo in ((tmp_path / "a", jobs), (tmp_path / "b", one_shard_each)):
        out.mkdir()
        stage = PackStage(CFG, StageContext(seed=0, recipe_hash="test", run_dir=str(run)), str(rows_dir), str(out))
        for job in todo:
            stage.write_job(job)
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()})
    assert digests[0] == digests[1] and "t-000001.tar" not in digests[0] and len(digests[0]) > 4


def _split(job: dict) -> list[dict]:
    out, start = [], 0
    for name, plan_hash, size in zip(job["shards"], job["plan_hashes"], job["sizes"]):
        part = {k: job[k][start:start + size] for k in ("unit_id", "_fragment", "_row")}
        out.append({"shards": [name], "plan_hashes": [plan_hash], "sizes": [size], **part})
        start += size
    return out


def test_fragments_of_one_row_group_still_pack(run, tmp_path):
    table = pq.read_table(list_fragments(stage_dir(run, "score"))[0])
    path = fragment_path(tmp_path, table["unit_id"].to_pylist())
    pq.write_table(table, path, compression="zstd")  # the layout before fragments had row groups
    plan = plan_shards(read_units(tmp_path, columns=list(PLAN_COLUMNS)), CFG)
    where = [plan.order[c].to_pylist() for c in ("_fragment", "_row")]
    reader = RowReader(tmp_path, *where)
    assert [reader.take(f, r)["unit_id"] for f, r in zip(*where)] == plan.order["unit_id"].to_pylist()
    assert reader.bytes_read <= path.size() + 8 and not reader.pending  # its last 8 bytes read twice


def test_read_units_keeps_the_first_copy_and_where_it_lies(tmp_path):
    def rows(units, task):
        return pa.Table.from_pylist([{"unit_id": u, "task": task} for u in units], schema=ROW_SCHEMA)

    a, b = write_fragment(tmp_path, rows(["u1", "u2", "u3"], "a")), write_fragment(tmp_path, rows(["u3", "u4"], "b"))
    first = sorted([a, b])[0]
    table = read_units(tmp_path, columns=["unit_id", "task"])
    assert sorted(table["unit_id"].to_pylist()) == ["u1", "u2", "u3", "u4"]
    columns = (table[c].to_pylist() for c in ("unit_id", "_fragment", "_row"))
    where = {unit: (frag, row) for unit, frag, row in zip(*columns)}
    assert where["u3"][0] == first.name  # fragment-name order decides which copy is first
    for unit, (frag, row) in where.items():
        assert pq.read_table(tmp_path / frag)["unit_id"][row].as_py() == unit


def test_the_ledger_accepts_planned_rows_into_their_shards(run, monkeypatch, tmp_path):
    rows = read_units(stage_dir(run, "score"), columns=list(PLAN_COLUMNS))
    plan = _plan(run, monkeypatch)
    monkeypatch.setattr(fragments, "COMBINE_FRAGMENTS", 3)  # several groups of fragments, streamed one by one
    monkeypatch.setattr(ledger_module, "COMBINE_FRAGMENTS", 3)
    write_ledger(tmp_path, stage_dir(run, "score"), rows, plan.shard_column(rows.num_rows), {"score": {"units": 1}})
    ledger = read_ledger(tmp_path)
    whole = read_units(stage_dir(run, "score"))  # the naive way: every column of every unit in memory at once
    assert ledger.equals(build_ledger(whole, plan.shard_column(whole.num_rows)).cast(ledger.schema))
    assert ledger_plan(tmp_path / LEDGER_NAME) == {"score": {"units": 1}}
    labels = read_ledger(tmp_path, ["status", "task"], labels=["status", "task"])  # one dictionary, many row groups
    assert labels.group_by(["status", "task"]).aggregate([([], "count_all")]).num_rows > 1
    names = [plan.shards[i]["shard"] for i in plan.order["shard"].to_pylist()]
    shard_of = dict(zip(plan.order["unit_id"].to_pylist(), names))
    for unit, status, shard in zip(*(ledger[c].to_pylist() for c in ("unit_id", "status", "shard"))):
        assert (status == ACCEPTED) == (unit in shard_of) and shard == shard_of.get(unit)
    with pytest.raises(ValueError, match="live units have no shard"):
        build_ledger(whole, pa.nulls(whole.num_rows, pa.string()))
