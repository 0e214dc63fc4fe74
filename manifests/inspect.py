"""Read-only views of a run dir for `x2edit-shards`: the shard list, run statistics and one pair's record.

pyarrow only (no DuckDB, no Ray), so `ls`, `stats` and `show` start fast. A run dir is either a pipeline run
(its `recipe.json` names the shard prefix) or an export made by `x2edit-shards export` (`export.json`).
"""
from __future__ import annotations

import hashlib
import json
import tarfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from manifests.commit import TMP_MARKER
from manifests.fragments import list_fragments
from manifests.ledger import LEDGER_NAME
from manifests.schema import ACCEPTED, FAILED, REJECTED, STAGES
from manifests.shards import shard_summary

EXPORT_FILE = "export.json"
SCORE_PREFIX = "score_"


class RunError(Exception):
    """A problem with the run dir or the request, worded for the user; the CLI prints it and exits 1."""


@dataclass(frozen=True)
class Run:
    root: Path
    prefix: str

    @property
    def shards_dir(self) -> Path:
        return self.root / "shards"

    @property
    def ledger_path(self) -> Path | None:
        path = self.root / LEDGER_NAME
        return path if path.exists() else None

    @property
    def fragments_dir(self) -> Path:
        return self.root / "stages" / "score"  # the last stage's rows: thumbnails of the units that ended

    def manifests(self) -> list[Path]:
        return sorted(self.shards_dir.glob(f"{self.prefix}-*.parquet"))

    def tar(self, shard: str) -> Path:
        return self.shards_dir / f"{shard}.tar"

    def report_json(self) -> dict | None:
        path = self.root / "report.json"
        return json.loads(path.read_text()) if path.exists() else None


def open_run(path: str | Path) -> Run:
    root = Path(path)
    if not root.is_dir():
        raise RunError(f"{root}: no such run dir")
    for name, prefix_of in (("recipe.json", lambda d: d["recipe"]["pack"]["prefix"]),
                            (EXPORT_FILE, lambda d: d["prefix"])):
        if (root / name).exists():
            try:
                return Run(root, prefix_of(json.loads((root / name).read_text())))
            except (KeyError, TypeError, json.JSONDecodeError) as exc:
                raise RunError(f"{root / name}: cannot read the shard prefix ({type(exc).__name__}: {exc})") from exc
    raise RunError(f"{root} is not a run dir: it has neither recipe.json (a pipeline run) "
                   f"nor {EXPORT_FILE} (an x2edit-shards export)")


# ---------------------------------------------------------------------------------------------- ls

def list_shards(run: Run) -> list[dict]:
    """Every shard file with its recorded summary and commit state (cheap: no tar is read)."""
    tars = {p.stem: p for p in run.shards_dir.glob(f"{run.prefix}-*.tar")}
    manifests = {p.stem: p for p in run.manifests()}
    rows = []
    for name in sorted(set(tars) | set(manifests)):
        row = {"shard": name, "pairs": None, "bytes": tars[name].stat().st_size if name in tars else None,
               "sha256": None}
        if name not in manifests:
            row["state"] = "uncommitted (tar without manifest; a rerun discards it)"
        else:
            try:
                summary = shard_summary(manifests[name])
            except (KeyError, ValueError, OSError, pa.ArrowException) as exc:
                rows.append({**row, "state": f"bad manifest ({type(exc).__name__}: {exc})"})
                continue
            recorded = {"pairs": summary["pairs"], "sha256": summary["sha256"]}
            if name not in tars:
                state = "broken: manifest without tar"
            elif row["bytes"] != summary["bytes"]:
                state = f"broken: tar is {row['bytes']} bytes, manifest says {summary['bytes']}"
            else:
                state = "committed"
            row.update(recorded, state=state)
        rows.append(row)
    return rows


def temp_files(run: Run) -> list[Path]:
    return sorted(p for p in run.shards_dir.glob(".*") if TMP_MARKER in p.name)


# ------------------------------------------------------------------------------------------- stats

def _group_counts(table: pa.Table, keys: list[str]) -> list[dict]:
    counts = table.group_by(keys).aggregate([([], "count_all")]).to_pylist()
    return sorted(counts, key=lambda r: -r["count_all"])


def funnel(ledger: pa.Table) -> list[dict]:
    """Units entering and leaving each stage, with rejections by reason and failures by error class.

    Same definition as the pipeline's run report: samples enter `source`, `instruct` turns them into pairs,
    `pack` lets out the accepted pairs.
    """
    samples = pc.count_distinct(ledger["sample_id"]).as_py()
    pairs = pc.count(ledger["pair_id"]).as_py()
    accepted = pc.sum(pc.equal(ledger["status"], ACCEPTED)).as_py() or 0
    ended = ledger.filter(pc.is_in(ledger["status"], pa.array([REJECTED, FAILED])))
    by_stage: dict[str, dict] = defaultdict(lambda: {REJECTED: {}, FAILED: {}})
    for r in _group_counts(ended.select(["stage", "status", "reason"]), ["stage", "status", "reason"]):
        by_stage[r["stage"]][r["status"]][r["reason"]] = r["count_all"]
    out, entering = [], samples
    for stage in STAGES:
        ended_here = sum(by_stage[stage][REJECTED].values()) + sum(by_stage[stage][FAILED].values())
        leaving = {"instruct": pairs, "pack": accepted}.get(stage, entering - ended_here)
        out.append({"stage": stage, "in": entering, "out": leaving,
                    "rejected": by_stage[stage][REJECTED], "failed": by_stage[stage][FAILED]})
        entering = leaving
    return out


def _by_status(ledger: pa.Table, key: str) -> dict[str, dict]:
    rows = ledger.filter(pc.is_valid(ledger[key])).select([key, "status"])
    out: dict[str, dict] = defaultdict(lambda: dict.fromkeys((ACCEPTED, REJECTED, FAILED), 0))
    for r in _group_counts(rows, [key, "status"]):
        out[r[key]][r["status"]] = r["count_all"]
    return dict(sorted(out.items()))


def score_distributions(run: Run) -> dict[str, dict[str, dict]]:
    """{score: {task: n, min, p10, p50, p90, max}} over the accepted pairs (the manifests' score_* columns)."""
    tables = []
    for path in run.manifests():
        names = [n for n in pq.read_schema(path).names if n.startswith(SCORE_PREFIX)]
        tables.append(pq.read_table(path, columns=["task", *names]))
    if not tables:
        return {}
    table = pa.concat_tables(tables, promote_options="default")
    tasks = table["task"]
    out: dict[str, dict] = {}
    for name in sorted(n for n in table.column_names if n.startswith(SCORE_PREFIX)):
        per_task = {}
        for task in sorted(set(tasks.to_pylist())):
            values = pc.drop_null(pc.filter(table[name], pc.equal(tasks, task)))
            if len(values):
                q = pc.quantile(values, q=[0.1, 0.5, 0.9]).to_pylist()
                per_task[task] = {"n": len(values), "min": pc.min(values).as_py(), "p10": q[0], "p50": q[1],
                                  "p90": q[2], "max": pc.max(values).as_py()}
        out[name[len(SCORE_PREFIX):]] = per_task
    return out


def run_stats(run: Run) -> dict:
    """Funnel, tasks vs target, editors, busy time and rate per stage, and score distributions."""
    if not run.ledger_path:
        raise RunError(f"{run.root} has no {LEDGER_NAME} (an export?): stats needs the ledger of a pipeline run")
    ledger = pq.read_table(run.ledger_path, columns=["sample_id", "pair_id", "status", "stage", "reason", "task",
                                                     "editor", *(f"t_{s}" for s in STAGES[:-1])])
    steps = funnel(ledger)
    report = run.report_json() or {}
    target = {t: v.get("target_share") for t, v in report.get("accepted_per_task", {}).items()}
    tasks = _by_status(ledger, "task")
    accepted = steps[-1]["out"]
    for task, counts in tasks.items():
        counts["share"] = round(counts[ACCEPTED] / accepted, 4) if accepted else 0.0
        counts["target_share"] = target.get(task)
    throughput = {}
    for step in steps[:-1]:
        busy = pc.sum(ledger[f"t_{step['stage']}"]).as_py() or 0.0
        throughput[step["stage"]] = {"units": step["in"], "busy_s": round(busy, 3),
                                     "units_per_busy_s": round(step["in"] / busy, 2) if busy else None}
    walls = run.root / "invocations.json"
    wall = sum(w["wall_s"] for w in json.loads(walls.read_text())) if walls.exists() else None
    return {"units": {r["status"]: r["count_all"] for r in _group_counts(ledger.select(["status"]), ["status"])},
            "funnel": steps, "tasks": tasks, "editors": _by_status(ledger, "editor"), "throughput": throughput,
            "wall_s": wall, "pairs_per_s": round(accepted / wall, 3) if wall else None,
            "scores": score_distributions(run)}


# -------------------------------------------------------------------------------------------- show

def read_members(run: Run, shard: str, keys: set[str]) -> dict[str, dict[str, bytes]]:
    """{key: {member name: bytes}} for the given keys of one shard, in one pass over its tar."""
    tar_path = run.tar(shard)
    found: dict[str, dict[str, bytes]] = defaultdict(dict)
    try:
        with tarfile.open(tar_path, mode="r:") as tar:
            for info in tar:
                key = info.name.partition(".")[0]
                if key in keys:
                    found[key][info.name] = tar.extractfile(info).read()
                elif len(found) == len(keys):
                    break  # members of a key are adjacent: every key is complete
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise RunError(f"{tar_path}: cannot read ({type(exc).__name__}: {exc}); "
                       "check the corpus with `x2edit-shards validate`") from exc
    return dict(found)


def ended_rows(run: Run, unit_ids: list[str], columns: list[str]) -> dict[str, dict]:
    """Columns of the last stage's rows of units that ended: what the ledger does not keep (instruction_zh,
    params, provenance, ...) and `thumb`, the src | edited thumbnail of units that ended after their images
    existed. Empty when the run dir has no stage fragments (an export)."""
    if not unit_ids:
        return {}
    wanted = pa.array(sorted(set(unit_ids)), pa.string())
    rows: dict[str, dict] = {}
    for path in list_fragments(run.fragments_dir):
        # unit ids first: the wide columns (thumbnails) are read only from the few fragments that matter
        if not pc.any(pc.is_in(pq.read_table(path, columns=["unit_id"])["unit_id"], wanted)).as_py():
            continue
        table = pq.read_table(path, columns=["unit_id", *columns], filters=pc.is_in(pc.field("unit_id"), wanted))
        for row in table.to_pylist():
            rows.setdefault(row["unit_id"], row)
    return rows


def _ledger_row(run: Run, key: str) -> dict | None:
    if not run.ledger_path:
        return None
    rows = pq.read_table(run.ledger_path, filters=(pc.field("pair_id") == key) | (pc.field("unit_id") == key))
    return rows.to_pylist()[0] if rows.num_rows else None


def _manifest_row(run: Run, key: str, shard: str | None) -> dict | None:
    paths = [run.shards_dir / f"{shard}.parquet"] if shard else run.manifests()
    for path in paths:
        if not path.exists():
            raise RunError(f"the ledger puts {key!r} in shard {shard}, but {path} does not exist")
        rows = pq.read_table(path, filters=pc.field("pair_id") == key)
        if rows.num_rows:
            return rows.to_pylist()[0]
    return None


def show_pair(run: Run, key: str, out: Path) -> dict:
    """The record of one pair (or ended unit) and its images written into `out`; returns the record."""
    ledger = _ledger_row(run, key)
    accepted = ledger is None or ledger["status"] == ACCEPTED
    manifest = _manifest_row(run, key, ledger["shard"] if ledger else None) if accepted else None
    if ledger is None and manifest is None:
        raise RunError(f"no pair or unit {key!r} in {run.root} (searched "
                       f"{LEDGER_NAME + ' and ' if run.ledger_path else ''}{len(run.manifests())} manifests); "
                       "list ids with `x2edit-shards sample RUN`")
    if accepted and manifest is None:
        raise RunError(f"the ledger accepts {key!r} into shard {ledger['shard']}, but its manifest has no such pair")
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    if not accepted:
        return _ended_record(run, ledger, out)
    members = read_members(run, manifest["shard"], {key}).get(key, {})
    expected = dict(zip(manifest["members"], manifest["member_sha256"]))
    missing = sorted(set(expected) - set(members))
    if missing:
        raise RunError(f"{run.tar(manifest['shard'])}: member {missing[0]} of pair {key!r} is listed in "
                       f"{manifest['shard']}.parquet but missing from the tar; run `x2edit-shards validate`")
    for name, data in members.items():
        if hashlib.sha256(data).hexdigest() != expected.get(name):
            raise RunError(f"{run.tar(manifest['shard'])}: member {name} does not match its manifest checksum; "
                           "run `x2edit-shards validate`")
        (out / name).write_bytes(data)
    record = json.loads(members[f"{key}.json"])
    return {**record, "decision": ACCEPTED, "shard": manifest["shard"], "files": [str(out / n) for n in members]}


def _ended_record(run: Run, ledger: dict, out: Path) -> dict:
    unit = ledger["unit_id"]
    extra = ended_rows(run, [unit], ["instruction_zh", "params", "subject", "provenance", "source_meta", "thumb"])
    extra = extra.get(unit, {})
    thumb = extra.pop("thumb", None)
    record = {**ledger, **{k: v for k, v in extra.items() if k != "unit_id"}, "decision": ledger["status"]}
    for key in ("scores", "thresholds", "params", "subject", "provenance", "source_meta"):
        if isinstance(record.get(key), str):
            record[key] = json.loads(record[key])
    record["files"] = []
    if thumb is not None:  # the pipeline keeps no full-size images of units it ended
        (out / f"{unit}.thumb.jpg").write_bytes(thumb)
        record["files"] = [str(out / f"{unit}.thumb.jpg")]
    return record
