"""x2edit-shards on a real small run: every command, validate on corrupted copies, and the corpus read by
webdataset, Hugging Face datasets, Ray Data, pandas, DuckDB and polars."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from manifests.cli import main
from manifests.html_report import write_html_report
from manifests.inspect import open_run, run_stats
from manifests.shards import iter_shard, read_manifests, write_shard
from manifests.validate import validate

pytest_plugins = ["tests.conftest_cli"]
ROOT = Path(__file__).resolve().parents[1]


def cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def manifest_rows(run_dir: Path) -> dict[str, dict]:
    return {r["pair_id"]: r for r in read_manifests(run_dir / "shards", "small").to_pylist()}


def ledger_rows(run_dir: Path) -> list[dict]:
    return pq.read_table(run_dir / "ledger.parquet").to_pylist()


def test_cli_imports_neither_ray_nor_torch(small_run, tmp_path):
    pair = next(iter(manifest_rows(small_run)))
    script = f"""
import sys
from manifests.cli import main
run = {str(small_run)!r}
for argv in (["ls", run], ["stats", run], ["show", run, {pair!r}, "--out", {str(tmp_path / "show")!r}],
             ["sample", run, "--n", "3"], ["validate", run], ["export", run, "--out", {str(tmp_path / "exp")!r}],
             ["report", run, "--out", {str(tmp_path / "r.html")!r}]):
    assert main(argv) == 0, argv
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "torch"))
assert not heavy, heavy
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


def test_ls_lists_committed_shards(small_run, capsys):
    rc, out, _ = cli(capsys, "ls", small_run)
    report = json.loads((small_run / "report.json").read_text())
    assert rc == 0
    assert out.strip().splitlines()[-1].startswith(f"5 of 5 shards committed, {report['accepted']} pairs")
    rc, out, _ = cli(capsys, "ls", small_run, "--json")
    rows = json.loads(out)
    assert [r["state"] for r in rows] == ["committed"] * report["shards"]["count"]
    for r in rows:
        tar = small_run / "shards" / f"{r['shard']}.tar"
        assert r["sha256"] == hashlib.sha256(tar.read_bytes()).hexdigest() and r["bytes"] == tar.stat().st_size


def test_stats_agree_with_the_pipeline_report(small_run, capsys):
    stats = run_stats(open_run(small_run))
    report = json.loads((small_run / "report.json").read_text())
    assert stats["funnel"] == report["funnel"]
    assert stats["units"] == report["units"]
    assert {t: c["accepted"] for t, c in stats["tasks"].items() if c["accepted"]} == \
        {t: v["accepted"] for t, v in report["accepted_per_task"].items() if v["accepted"]}
    assert {s: t["busy_s"] for s, t in stats["throughput"].items()} == report["busy_seconds_per_stage"]
    assert sum(c["accepted"] for c in stats["editors"].values()) == report["accepted"]
    accepted = manifest_rows(small_run).values()
    removal = [r["score_change_global"] for r in accepted if r["task"] == "subject_removal"]
    assert stats["scores"]["change_global"]["subject_removal"]["n"] == len(removal)
    assert stats["scores"]["change_global"]["subject_removal"]["max"] == max(removal)
    rc, out, _ = cli(capsys, "stats", small_run)
    assert rc == 0 and "funnel" in out and "throughput" in out and "score change_global" in out


def test_show_writes_record_and_images(small_run, tmp_path, capsys):
    rows = manifest_rows(small_run)
    pair = next(r for r in rows.values() if r["region_mask"])
    rc, out, _ = cli(capsys, "show", small_run, pair["pair_id"], "--out", tmp_path / "pair")
    record = json.loads(out)
    assert rc == 0 and record["decision"] == "accepted" and record["shard"] == pair["shard"]
    assert record["instruction_en"] == pair["instruction_en"] and record["instruction_zh"] == pair["instruction_zh"]
    assert record["provenance"]["editor"] == pair["editor"] and record["scores"]
    for name, digest in zip(pair["members"], pair["member_sha256"]):
        assert hashlib.sha256((tmp_path / "pair" / name).read_bytes()).hexdigest() == digest

    ended = next(r for r in ledger_rows(small_run) if r["status"] == "rejected" and r["pair_id"])
    rc, out, _ = cli(capsys, "show", small_run, ended["pair_id"], "--out", tmp_path / "ended")
    record = json.loads(out)
    assert rc == 0 and record["reason"] == ended["reason"] and record["instruction_zh"]
    assert record["scores"] == json.loads(ended["scores"])
    assert [Path(f).name for f in record["files"]] == [f"{ended['unit_id']}.thumb.jpg"]

    rc, out, err = cli(capsys, "show", small_run, "no-such-pair", "--out", tmp_path / "missing")
    assert rc == 1 and out == "" and "no pair or unit 'no-such-pair'" in err
    assert not (tmp_path / "missing").exists()


def _sample(capsys, run_dir, *args) -> list[dict]:
    rc, out, err = cli(capsys, "sample", run_dir, "--json", *args)
    assert rc == 0, err
    return [json.loads(line) for line in out.splitlines()]


def test_sample_selects_by_task_decision_reason_and_expression(small_run, tmp_path, capsys):
    rows = manifest_rows(small_run)
    expected_color = sorted(p for p, r in rows.items() if r["task"] == "color_change")
    assert sorted(r["unit_id"] for r in _sample(capsys, small_run, "--task", "color_change", "--n", "20")) == \
        expected_color
    expected = sorted(p for p, r in rows.items() if r["score_change_global"] < 0.1)
    for where in ("score_change_global < 0.1", "change_global < 0.1"):  # the bare score name is an alias
        assert sorted(r["unit_id"] for r in _sample(capsys, small_run, "--n", "0", "--where", where)) == expected
    assert len(_sample(capsys, small_run, "--n", "3")) == 3
    seeded = ("--n", "5", "--seed", "4")
    assert _sample(capsys, small_run, *seeded) == _sample(capsys, small_run, *seeded)

    ended = [r for r in ledger_rows(small_run) if r["status"] == "rejected" and r["reason"] == "no_op_edit"]
    want = sorted(r["unit_id"] for r in ended if json.loads(r["scores"])["change_global"] < 0.01)
    got = _sample(capsys, small_run, "--decision", "rejected", "--reason", "no_op_edit", "--where",
                  "score_change_global < 0.01")
    assert want and sorted(r["unit_id"] for r in got) == want
    assert {r["decision"] for r in got} == {"rejected"} and all(r["score_change_outside"] is not None for r in got)

    rc, out, _ = cli(capsys, "sample", small_run, "--task", "color_change", "--images", tmp_path)
    assert rc == 0 and out.splitlines()[-1] == f"{len(expected_color)} of {len(expected_color)} matching units " \
        "(decision accepted, seed 0)"
    assert sorted(p.name for p in tmp_path.iterdir()) == expected_color
    assert all(len(list((tmp_path / p).iterdir())) == len(rows[p]["members"]) for p in expected_color)

    rc, out, err = cli(capsys, "sample", small_run, "--where", "judge_sum < 8")
    assert rc == 1 and "bad --where expression 'judge_sum < 8'" in err and "score_change_global" in err
    rc, _, err = cli(capsys, "sample", small_run, "--task", "colour_change")
    assert rc == 1 and "unknown task 'colour_change'" in err


def test_export_writes_a_valid_deterministic_slice(small_run, tmp_path, capsys):
    source = manifest_rows(small_run)
    args = ["--task", "subject_removal", "--task", "color_change", "--shard-size", "3"]
    assert cli(capsys, "export", small_run, "--out", tmp_path / "a", *args)[0] == 0
    assert cli(capsys, "export", small_run, "--out", tmp_path / "b", *args)[0] == 0
    assert validate(open_run(tmp_path / "a")) == ([], {"shards": 2, "pairs": 4, "members": 16,
                                                       "bytes": sum(p.stat().st_size for p in
                                                                    (tmp_path / "a" / "shards").glob("*.tar"))})
    exported = {r["pair_id"]: r for r in read_manifests(tmp_path / "a" / "shards", "small").to_pylist()}
    assert sorted(exported) == sorted(p for p, r in source.items() if r["task"] in ("subject_removal", "color_change"))
    for pair, row in exported.items():
        assert {k: v for k, v in row.items() if k != "shard"} == {k: source[pair][k] for k in row if k != "shard"}
    for tar in sorted((tmp_path / "a" / "shards").glob("*.tar")):
        assert tar.read_bytes() == (tmp_path / "b" / "shards" / tar.name).read_bytes()

    n = sum(1 for r in source.values() if r["score_change_global"] > 0.2)
    rc, out, _ = cli(capsys, "export", small_run, "--out", tmp_path / "c", "--where", "score_change_global > 0.2",
                     "--prefix", "big-change")
    assert rc == 0 and out.startswith(f"exported {n} pairs into 1 shards")
    assert (tmp_path / "c" / "shards" / "big-change-000000.tar").exists()
    rc, _, err = cli(capsys, "export", small_run, "--out", tmp_path / "a", *args)
    assert rc == 1 and "is not an empty directory" in err


def _copy(run_dir: Path, dst: Path) -> Path:
    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns("stages"))
    return dst


def _problems(run_dir: Path) -> str:
    problems, _ = validate(open_run(run_dir))
    return "\n".join(problems)


def test_validate_accepts_the_run_and_pinpoints_corruption(small_run, tmp_path, capsys):
    rc, out, _ = cli(capsys, "validate", small_run)
    assert rc == 0 and out.startswith(f"ok: {small_run}: 5 shards, 39 pairs")

    truncated = _copy(small_run, tmp_path / "truncated")
    tar = truncated / "shards" / "small-000002.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    rc, _, err = cli(capsys, "validate", truncated)
    assert rc == 1 and f"{tar}: truncated or corrupt tar" in err and f"{tar}: {tar.stat().st_size} bytes" in err

    duplicated = _copy(small_run, tmp_path / "duplicated")
    shards = duplicated / "shards"
    first = next(iter_shard(shards / "small-000000.tar"))
    key = first["__key__"]
    members = [(f"{s['__key__']}.{f}", d) for s in [*iter_shard(shards / "small-000001.tar"), first]
               for f, d in s.items() if f != "__key__"]
    copied = pq.read_table(shards / "small-000000.parquet").slice(0, 1)
    copied = copied.set_column(copied.schema.get_field_index("shard"), "shard", pa.array(["small-000001"]))
    table = pa.concat_tables([pq.read_table(shards / "small-000001.parquet"), copied], promote_options="default")
    write_shard(shards, "small-000001", members, table, {"plan_hash": "tampered"})
    assert f"duplicate key {key}: in small-000000 and small-000001" in _problems(duplicated)

    edited = _copy(small_run, tmp_path / "edited")
    path = edited / "shards" / "small-000003.parquet"
    table = pq.read_table(path)
    rows = table.to_pylist()
    old = rows[0]["instruction_en"]
    rows[0]["instruction_en"] = "Make it pop."
    rows[1]["member_sha256"] = ["0" * 64] + rows[1]["member_sha256"][1:]
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    problems = _problems(edited)
    assert (f"small-000003.tar: {rows[0]['pair_id']}.json has instruction_en={old!r}, the manifest says "
            "'Make it pop.'") in problems
    assert re.search(rf"member {rows[1]['members'][0]} has sha256 \w+…, small-000003.parquet says 0000", problems)

    ledger = _copy(small_run, tmp_path / "ledger")
    table = pq.read_table(ledger / "ledger.parquet")
    dropped = next(r for r in table.to_pylist() if r["status"] == "accepted")["unit_id"]
    pq.write_table(table.filter(pc.not_equal(table["unit_id"], dropped)), ledger / "ledger.parquet")
    (ledger / "shards" / "small-000009.tar").write_bytes(b"leftover")
    problems = _problems(ledger)
    assert f"1 pairs in a manifest but not accepted by the ledger (first: {dropped})" in problems
    assert "report.json: accepted is 39, the run has 38" in problems
    assert "small-000009.tar: tar without manifest" in problems

    # A rejected unit missing from the ledger: the shards still agree, the plan (stage completion) does not.
    for name, stages in (("lacking", True), ("lacking-copied", False)):
        lacking = tmp_path / name
        shutil.copytree(small_run, lacking, ignore=None if stages else shutil.ignore_patterns("stages"))
        table = pq.read_table(lacking / "ledger.parquet")
        lost = next(r for r in table.to_pylist() if r["status"] == "rejected")["unit_id"]
        pq.write_table(table.filter(pc.not_equal(table["unit_id"], lost)), lacking / "ledger.parquet")
        origin = (f"({lacking / 'stages' / 'score' / 'COMPLETE.json'}); missing: 1 (first: {lost})" if stages
                  else "(the plan recorded in ledger.parquet)")
        assert (f"{lacking / 'ledger.parquet'}: has {table.num_rows - 1} units, stage 'score' completed "
                f"{table.num_rows} {origin}") in _problems(lacking).splitlines()


def test_report_is_self_contained_and_small(small_run, expected_gallery, tmp_path, capsys):
    rc, out, _ = cli(capsys, "report", small_run, "--out", tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    assert rc == 0 and out.startswith(f"wrote {tmp_path / 'report.html'}")
    assert page.count('<figure class="card') == expected_gallery(per_group=8)
    assert not re.search(r"(src|href)=\"(https?:)?//", page), "the report must not fetch anything"
    assert page.count('src="data:image/png;base64,') == len(run_stats(open_run(small_run))["scores"])
    assert 'data-decision="rejected" data-reason="no_op_edit"' in page
    assert len(page) < 1_000_000
    small = write_html_report(small_run, tmp_path / "small.html", per_group=1)
    assert small.read_text().count('<figure class="card') == expected_gallery(per_group=1)


def test_corpus_opens_in_common_readers(small_run, ray_cluster, tmp_path):
    import duckdb
    import pandas as pd
    import polars as pl
    import ray.data
    import webdataset as wds
    from datasets import load_dataset

    rows = manifest_rows(small_run)
    tars = sorted(str(p) for p in (small_run / "shards").glob("small-*.tar"))
    manifests = sorted(str(p) for p in (small_run / "shards").glob("small-*.parquet"))
    regions = sum(r["region_mask"] for r in rows.values())

    urls = str(small_run / "shards" / f"small-{{000000..{len(tars) - 1:06d}}}.tar")  # brace-expanded names
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert sorted(s["__key__"] for s in samples) == sorted(rows)
    assert all(s["json"]["pair_id"] == s["__key__"] and s["src.jpg"].size == s["mask.png"].size for s in samples)
    assert sum(s["json"]["mask"] == "region" for s in samples) == regions > 0

    # Every pair carries the same members, so both stock readers work with their default arguments.
    hf = load_dataset("webdataset", data_files={"train": tars}, split="train", cache_dir=str(tmp_path / "hf"))
    assert sorted(hf["__key__"]) == sorted(rows) and all(m is not None for m in hf["mask.png"])
    assert hf[0]["json"]["instruction_zh"] == rows[hf[0]["__key__"]]["instruction_zh"]
    ray_rows = ray.data.read_webdataset(tars).take_all()
    assert sorted(r["__key__"] for r in ray_rows) == sorted(rows)
    assert all(r["mask.png"].shape[:2] == r["src.jpg"].shape[:2] for r in ray_rows)

    frame = pd.concat([pd.read_parquet(p) for p in manifests], ignore_index=True)
    assert sorted(frame["pair_id"]) == sorted(rows)
    assert len(pd.read_parquet(small_run / "ledger.parquet")) == len(ledger_rows(small_run))
    per_task = duckdb.sql(f"SELECT task, count(*) FROM read_parquet({manifests}, union_by_name = true) "
                          "GROUP BY task").fetchall()
    assert dict(per_task) == {t: sum(r["task"] == t for r in rows.values()) for t in {r["task"] for r in rows.values()}}
    polars = pl.concat([pl.read_parquet(p) for p in manifests], how="diagonal_relaxed")
    assert polars.height == len(rows) and polars.filter(pl.col("region_mask")).height == regions
