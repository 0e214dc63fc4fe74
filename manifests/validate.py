"""`x2edit-shards validate`: is a run dir an intact corpus?

Checks, each failure worded with the file, key and values involved:
- every committed tar opens and reads to the end; its size and sha256 match the manifest's summary;
- tar members and manifest rows agree one to one, member by member checksum, and each `<key>.json` agrees
  with its manifest row on pair id, task and instructions;
- keys are unique across the whole corpus; no uncommitted tars or temporary files are left;
- the ledger (when the run has one) accepts exactly the corpus's pairs into the shards that hold them, every
  unit has one terminal state, every ended unit has a stage and a reason, and report.json's counts agree;
- the ledger holds every planned unit and sample: its ids agree with each stage's completion record.
"""
from __future__ import annotations

import hashlib
import json
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from manifests.fragments import COMPLETE_NAME, plan_record, read_completion, read_units
from manifests.inspect import Run, list_shards, temp_files
from manifests.ledger import ledger_plan
from manifests.schema import ACCEPTED, STAGES, TERMINAL
from manifests.shards import shard_summary


def validate(run: Run) -> tuple[list[str], dict]:
    """(problems, counts); no problems means the corpus is intact."""
    problems: list[str] = []
    for row in list_shards(run):
        if row["state"].startswith("uncommitted"):
            problems.append(f"{run.tar(row['shard'])}: tar without manifest (uncommitted; a pipeline rerun "
                            "discards it)")
    problems += [f"{p}: temporary file left by an interrupted writer" for p in temp_files(run)]
    owner: dict[str, str] = {}
    totals = Counter()
    for path in run.manifests():
        totals.update(_check_shard(run, path, owner, problems))
    counts = {"shards": len(run.manifests()), **totals}
    if run.ledger_path:
        counts["ledger"] = _check_ledger(run, owner, totals, problems)
    return problems, counts


def _check_ledger(run: Run, owner: dict[str, str], totals: Counter, problems: list[str]) -> dict:
    table = pq.read_table(run.ledger_path, columns=["unit_id", "sample_id", "status", "stage", "reason", "shard"])
    ledger, where = table.to_pylist(), run.ledger_path
    problems += _check_plan(run, table)
    repeated = [u for u, n in Counter(r["unit_id"] for r in ledger).items() if n > 1]
    if repeated:
        problems.append(f"{where}: {len(repeated)} units have more than one row (first: {repeated[0]})")
    for r in ledger:
        if r["status"] not in TERMINAL:
            problems.append(f"{where}: unit {r['unit_id']} has status {r['status']!r}, not one of {TERMINAL}")
        elif r["status"] != ACCEPTED and not (r["stage"] and r["reason"]):
            problems.append(f"{where}: {r['status']} unit {r['unit_id']} has no stage or reason")
        elif r["status"] == ACCEPTED and owner.get(r["unit_id"], r["shard"]) != r["shard"]:
            problems.append(f"{where}: accepts {r['unit_id']} into {r['shard']}, the corpus has it in "
                            f"{owner[r['unit_id']]}")
    accepted = {r["unit_id"] for r in ledger if r["status"] == ACCEPTED}
    for label, ids in (("accepted by the ledger but in no manifest", sorted(accepted - set(owner))),
                       ("in a manifest but not accepted by the ledger", sorted(set(owner) - accepted))):
        if ids:
            problems.append(f"{len(ids)} pairs {label} (first: {ids[0]})")
    status = Counter(r["status"] for r in ledger)
    report = run.report_json()
    if report is not None:
        claims = {"units": (report["units"], dict(status)), "accepted": (report["accepted"], status[ACCEPTED]),
                  "shards.count": (report["shards"]["count"], len(run.manifests())),
                  "shards.pairs": (report["shards"]["pairs"], totals["pairs"]),
                  "shards.bytes": (report["shards"]["bytes"], totals["bytes"])}
        problems += [f"{run.root / 'report.json'}: {name} is {said}, the run has {actual}"
                     for name, (said, actual) in claims.items() if said != actual]
    return dict(status)


def _check_plan(run: Run, ledger: pa.Table) -> list[str]:
    """The ledger against the stages' completion records (or, for a corpus copied without its stage outputs,
    the copy of them the ledger was written with): one row for every planned unit and sample."""
    stages_dir = run.root / "stages"
    records = {s: r for s in STAGES[:-1] if (r := read_completion(stages_dir / s))}
    origin = {s: stages_dir / s / COMPLETE_NAME for s in records}
    if not records:
        records = ledger_plan(run.ledger_path)
        origin = {s: f"the plan recorded in {run.ledger_path.name}" for s in records}
    if "score" not in records:
        return [f"{run.ledger_path}: no completion record of stage 'score', so the ledger cannot be checked against "
                "the plan (rerun the pipeline on this run dir: it records completion without recomputing)"]
    have = plan_record(ledger)
    problems = []
    for stage, record in records.items():
        for kind, column in (("samples", "sample_id"), ("units", "unit_id")):
            if kind == "units" and stage == "source" or record[f"{kind}_sha"] == have[f"{kind}_sha"]:
                continue  # source units are samples, fanned out into pairs later
            fragments = read_units(stages_dir / stage, columns=sorted({"unit_id", column}))
            planned = fragments.column(column).to_pylist() if column in fragments.column_names else []
            missing = sorted(set(planned) - set(ledger.column(column).to_pylist()))
            first = f"; missing: {len(missing)} (first: {missing[0]})" if missing else ""
            problems.append(f"{run.ledger_path}: has {have[kind]} {kind}, stage {stage!r} completed "
                            f"{record[kind]} ({origin[stage]}){first}")
    return problems


def _check_shard(run: Run, path: Path, owner: dict[str, str], problems: list[str]) -> dict:
    shard = path.stem
    try:
        summary, table = shard_summary(path), pq.read_table(path)
    except (KeyError, ValueError, OSError, pa.ArrowException) as exc:
        problems.append(f"{path}: unreadable manifest or missing x2edit summary ({type(exc).__name__}: {exc})")
        return {}
    rows = table.select(["pair_id", "shard", "task", "instruction_en", "instruction_zh", "members",
                         "member_sha256"]).to_pylist()
    if summary.get("shard") != shard or summary.get("pairs") != len(rows):
        problems.append(f"{path}: its summary says shard {summary.get('shard')!r} with {summary.get('pairs')} "
                        f"pairs, the file is {shard} with {len(rows)} rows")
    for r in rows:
        if r["shard"] != shard:
            problems.append(f"{path}: pair {r['pair_id']} has shard={r['shard']!r}")
        strays = [m for m in r["members"] if m.partition(".")[0] != r["pair_id"]]
        if strays or len(r["members"]) != len(r["member_sha256"]):
            problems.append(f"{path}: pair {r['pair_id']} lists members {r['members']} with "
                            f"{len(r['member_sha256'])} checksums")
        if r["pair_id"] in owner:
            problems.append(f"duplicate key {r['pair_id']}: in {owner[r['pair_id']]} and {shard}")
        owner.setdefault(r["pair_id"], shard)
    tar_path = run.tar(shard)
    if not tar_path.exists():
        problems.append(f"{path}: committed manifest without its tar {tar_path.name}")
        return {"pairs": len(rows)}
    digest, size = _file_sha256(tar_path)
    if size != summary.get("bytes") or digest != summary.get("sha256"):
        problems.append(f"{tar_path}: {size} bytes, sha256 {digest[:16]}…; its manifest recorded "
                        f"{summary.get('bytes')} bytes, sha256 {str(summary.get('sha256'))[:16]}…")
    return {"pairs": len(rows), "members": _check_tar(run, shard, rows, problems), "bytes": size}


def _check_tar(run: Run, shard: str, rows: list[dict], problems: list[str]) -> int:
    """Members of one tar against its manifest rows; returns the number of members read."""
    tar_path = run.tar(shard)
    expected = {name: digest for r in rows for name, digest in zip(r["members"], r["member_sha256"])}
    by_key = {r["pair_id"]: r for r in rows}
    seen: set[str] = set()
    try:
        with tarfile.open(tar_path, mode="r:") as tar:
            for info in tar:
                name, key = info.name, info.name.partition(".")[0]
                data = tar.extractfile(info).read() if info.isfile() else b""
                if name in seen:
                    problems.append(f"{tar_path}: member {name} appears twice")
                elif name not in expected:
                    problems.append(f"{tar_path}: member {name} is not listed in {shard}.parquet")
                elif hashlib.sha256(data).hexdigest() != expected[name]:
                    problems.append(f"{tar_path}: member {name} has sha256 {hashlib.sha256(data).hexdigest()[:16]}…, "
                                    f"{shard}.parquet says {expected[name][:16]}…")
                elif name == f"{key}.json" and key in by_key:
                    problems += _json_disagreements(tar_path, name, data, by_key[key])
                seen.add(name)
    except (tarfile.TarError, OSError, EOFError) as exc:
        problems.append(f"{tar_path}: truncated or corrupt tar after {len(seen)} members "
                        f"({type(exc).__name__}: {exc})")
        return len(seen)
    problems += [f"{tar_path}: member {n} listed in {shard}.parquet is missing" for n in sorted(set(expected) - seen)]
    return len(seen)


def _json_disagreements(tar_path: Path, name: str, data: bytes, row: dict) -> list[str]:
    try:
        record = json.loads(data)
    except ValueError as exc:
        return [f"{tar_path}: member {name} is not JSON ({exc})"]
    return [f"{tar_path}: {name} has {field}={record.get(field)!r}, the manifest says {row[field]!r}"
            for field in ("pair_id", "task", "instruction_en", "instruction_zh") if record.get(field) != row[field]]


def _file_sha256(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size
