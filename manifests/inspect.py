"""Read-only views of a run dir for `x2edit-shards`: the shard list, run statistics, and reading pairs and
ended units back (manifests/show.py builds one pair's record from these).

pyarrow only (no DuckDB, no Ray), so `ls`, `stats` and `show` start fast. A run dir is either a pipeline run
(its `recipe.json` names the shard prefix) or an export made by `x2edit-shards export` (`export.json`), in a
local or shared folder or an object store (`s3://bucket/run`, manifests/storage.py): every file is read
through `Run.root`, a StorePath, and each file once.
"""
from __future__ import annotations

import json
import tarfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from manifests.commit import TMP_MARKER
from manifests.fragments import list_fragments
from manifests.ledger import LEDGER_NAME, read_ledger
from manifests.schema import ACCEPTED, FAILED, REJECTED, STAGES
from manifests.shards import shard_summary
from manifests.storage import StorePath, read_parquet, store_path

EXPORT_FILE = "export.json"
SCORE_PREFIX = "score_"

class RunError(Exception):
    """A problem with the run dir or the request, worded for the user; the CLI prints it and exits 1."""


@dataclass(frozen=True)
class Run:
    root: StorePath  # a local path or URL given here is made one
    prefix: str

    def __post_init__(self):
        object.__setattr__(self, "root", store_path(self.root))

    @property
    def shards_dir(self) -> StorePath:
        return self.root / "shards"

    @property
    def ledger_path(self) -> StorePath | None:
        path = self.root / LEDGER_NAME
        return path if path.exists() else None

    @property
    def fragments_dir(self) -> StorePath:
        return self.root / "stages" / "score"  # the last stage's rows: thumbnails of the units that ended

    def manifests(self) -> list[StorePath]:
        return self.shards_dir.glob(f"{self.prefix}-*.parquet")

    def tar(self, shard: str) -> StorePath:
        return self.shards_dir / f"{shard}.tar"

    def report_json(self) -> dict | None:
        return (self.root / "report.json").read_json()


def open_run(path: str | Path | StorePath) -> Run:
    """The run dir at a local path or a URL (`s3://bucket/run`: endpoint and credentials from the environment)."""
    try:
        root = store_path(path)
        found = root.is_dir()  # False for a missing bucket too
    except (ValueError, OSError) as exc:  # not a storage URL, or the store refused (credentials, network)
        raise RunError(f"{path}: cannot open the run dir ({type(exc).__name__}: {exc})") from exc
    if not found:
        raise RunError(f"{root}: no such run dir")
    for name, prefix_of in (("recipe.json", lambda d: d["recipe"]["pack"]["prefix"]),
                            (EXPORT_FILE, lambda d: d["prefix"])):
        try:
            if (body := (root / name).read_json()) is not None:
                return Run(root, prefix_of(body))
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise RunError(f"{root / name}: cannot read the shard prefix ({type(exc).__name__}: {exc})") from exc
    raise RunError(f"{root} is not a run dir: it has neither recipe.json (a pipeline run) "
                   f"nor {EXPORT_FILE} (an x2edit-shards export)")


# ---------------------------------------------------------------------------------------------- ls

def list_shards(run: Run) -> list[dict]:
    """Every shard file with its recorded summary and commit state (cheap: no tar is read; one listing gives
    the names and sizes)."""
    files = run.shards_dir.sizes(f"{run.prefix}-*")
    tars = {n.removesuffix(".tar"): size for n, size in files.items() if n.endswith(".tar")}
    manifests = {n.removesuffix(".parquet"): run.shards_dir / n for n in files if n.endswith(".parquet")}
    rows = []
    for name in sorted(set(tars) | set(manifests)):
        row = {"shard": name, "pairs": None, "bytes": tars.get(name), "sha256": None}
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


def temp_files(run: Run) -> list[StorePath]:
    return [p for p in run.shards_dir.glob(".*") if TMP_MARKER in p.name]


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


def editor_stats(ledger: pa.Table) -> dict[str, dict]:
    """Per editor: pairs by status, yield (accepted / attempted) and the reason that ended most of the rest,
    so an editor the policy always rejects stands out instead of hiding in its task's average."""
    editors = _by_status(ledger, "editor")
    ended = ledger.filter(pc.and_(pc.is_valid(ledger["editor"]), pc.not_equal(ledger["status"], ACCEPTED)))
    reasons = _group_counts(ended.select(["editor", "reason"]), ["editor", "reason"])
    top: dict[str, dict] = {}
    for r in sorted(reasons, key=lambda r: (-r["count_all"], r["reason"])):  # the most frequent first
        top.setdefault(r["editor"], {"reason": r["reason"], "count": r["count_all"]})
    for editor, counts in editors.items():
        attempts = counts[ACCEPTED] + counts[REJECTED] + counts[FAILED]
        counts.update({"attempts": attempts, "yield": round(counts[ACCEPTED] / attempts, 4),
                       "top_reason": top.get(editor)})
    return editors


def manifest_table(run: Run, pick, row_numbers: bool = False) -> pa.Table | None:
    """Columns of every manifest as one table (None when there is no manifest): `pick(names)` chooses them from
    each file's schema; `_row` numbers the rows within their manifest. Each manifest is opened once, and they
    are combined a few hundred at a time: a corpus has thousands, of a hundred rows each, and a chunk per
    file costs more than its values."""
    tables, pending = [], []
    for path in run.manifests():
        file = pq.ParquetFile(path.open())
        table = file.read(columns=pick(file.schema_arrow.names), use_threads=False)
        pending.append(table.append_column("_row", pa.array(np.arange(table.num_rows))) if row_numbers else table)
        if len(pending) == 256:
            tables.append(pa.concat_tables(pending, promote_options="default").combine_chunks())
            pending = []
    if not tables + pending:
        return None
    return pa.concat_tables(tables + pending, promote_options="default")


def score_distributions(run: Run) -> dict[str, dict[str, dict]]:
    """{score: {task: n, min, p10, p50, p90, max}} over the accepted pairs (the manifests' score_* columns)."""
    table = manifest_table(run, lambda names: ["task", *(n for n in names if n.startswith(SCORE_PREFIX))])
    if table is None:
        return {}
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
    labels = ["status", "stage", "reason", "task", "editor"]  # a few values each: dictionary-encoded, 4 B a row
    ledger = read_ledger(run.root, ["sample_id", "pair_id", *labels, *(f"t_{s}" for s in STAGES[:-1])], labels)
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
    walls = (run.root / "invocations.json").read_json()
    wall = sum(w["wall_s"] for w in walls) if walls is not None else None
    return {"units": {r["status"]: r["count_all"] for r in _group_counts(ledger.select(["status"]), ["status"])},
            "funnel": steps, "tasks": tasks, "editors": editor_stats(ledger), "throughput": throughput,
            "wall_s": wall, "pairs_per_s": round(accepted / wall, 3) if wall else None,
            "scores": score_distributions(run)}


# ------------------------------------------------------------------------------- reading pairs back

def read_members(run: Run, shard: str, keys: set[str]) -> dict[str, dict[str, bytes]]:
    """{key: {member name: bytes}} for the given keys of one shard, in one pass over its tar."""
    tar_path = run.tar(shard)
    found: dict[str, dict[str, bytes]] = defaultdict(dict)
    try:
        with tar_path.open_walk() as f, tarfile.open(fileobj=f, mode="r:") as tar:
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
    existed (made here from the kept images of a pair a refilter rejected: it leaves thumbnails to the few
    units a report shows). Empty when the run dir has no stage fragments (an export)."""
    if not unit_ids:
        return {}
    wanted = pa.array(sorted(set(unit_ids)), pa.string())
    images = ["src", "edited"] if "thumb" in columns else []
    rows: dict[str, dict] = {}
    for path in list_fragments(run.fragments_dir):
        # unit ids first: the wide columns (thumbnails) are read only from the few fragments that matter
        ids = read_parquet(path, ["unit_id"])["unit_id"]
        if not pc.any(pc.is_in(ids, wanted)).as_py():
            continue
        table = read_parquet(path, list(dict.fromkeys(["unit_id", *columns, *images])),
                             filters=pc.is_in(pc.field("unit_id"), wanted))
        for row in table.to_pylist():
            rows.setdefault(row["unit_id"], row)
    for row in rows.values():
        kept = [row[c] if c in columns else row.pop(c) for c in images]
        if images and row["thumb"] is None and all(kept):
            from manifests.images import contact_thumb

            row["thumb"] = contact_thumb(kept)
    return rows
