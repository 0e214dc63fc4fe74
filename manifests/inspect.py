"""Read-only views of a run dir for `x2edit-shards`: the shard list, run statistics, and reading pairs and
ended units back (manifests/show.py builds one pair's record from these).

pyarrow only (no DuckDB, no Ray), so `ls`, `stats` and `show` start fast. A run dir is either a pipeline run
(its `recipe.json` names the shard prefix) or an export made by `x2edit-shards export` (`export.json`).
"""
from __future__ import annotations

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


def score_distributions(run: Run) -> dict[str, dict[str, dict]]:
    """{score: {task: n, min, p10, p50, p90, max}} over the accepted pairs (the manifests' score_* columns)."""
    tables, pending = [], []
    for path in run.manifests():
        file = pq.ParquetFile(path)  # one open for schema and columns: a corpus has thousands of manifests
        names = [n for n in file.schema_arrow.names if n.startswith(SCORE_PREFIX)]
        pending.append(file.read(columns=["task", *names], use_threads=False))
        if len(pending) == 256:  # a few columns of a hundred rows each: chunks cost more than their values
            tables.append(pa.concat_tables(pending, promote_options="default").combine_chunks())
            pending = []
    if not tables + pending:
        return {}
    table = pa.concat_tables(tables + pending, promote_options="default")
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
    ledger = pq.read_table(run.ledger_path, columns=["sample_id", "pair_id", *labels, *(f"t_{s}" for s in STAGES[:-1])],
                           read_dictionary=labels)
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
            "funnel": steps, "tasks": tasks, "editors": editor_stats(ledger), "throughput": throughput,
            "wall_s": wall, "pairs_per_s": round(accepted / wall, 3) if wall else None,
            "scores": score_distributions(run)}


# ------------------------------------------------------------------------------- reading pairs back

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
    existed (made here from the kept images of a pair a refilter rejected: it leaves thumbnails to the few
    units a report shows). Empty when the run dir has no stage fragments (an export)."""
    if not unit_ids:
        return {}
    wanted = pa.array(sorted(set(unit_ids)), pa.string())
    images = ["src", "edited"] if "thumb" in columns else []
    rows: dict[str, dict] = {}
    for path in list_fragments(run.fragments_dir):
        # unit ids first: the wide columns (thumbnails) are read only from the few fragments that matter
        ids = pq.ParquetFile(path).read(columns=["unit_id"], use_threads=False)["unit_id"]  # read_table: 3x slower
        if not pc.any(pc.is_in(ids, wanted)).as_py():
            continue
        table = pq.read_table(path, columns=list(dict.fromkeys(["unit_id", *columns, *images])),
                              filters=pc.is_in(pc.field("unit_id"), wanted))
        for row in table.to_pylist():
            rows.setdefault(row["unit_id"], row)
    for row in rows.values():
        kept = [row[c] if c in columns else row.pop(c) for c in images]
        if images and row["thumb"] is None and all(kept):
            from manifests.images import contact_thumb

            row["thumb"] = contact_thumb(kept)
    return rows
