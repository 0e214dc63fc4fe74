"""Re-filter a finished run under another score policy, without running any model.

    python -m pipeline refilter --run-dir runs/a --recipe looser.yaml --out runs/a-looser

Scores are computed once; the policy only reads them (filters/policy.py). So a new corpus version is the
finished run's committed score-stage rows, each re-decided under the other recipe's `score` rules
(stages/score.py `policy_verdict`, the score stage's own decision), packed like a run: the new run dir holds
`stages/score` (the re-decided rows, with a completion record), shards, manifests, ledger and reports, so every
reader and `x2edit-shards validate` takes it as a normal run. Rows the policy rejected kept their images in the
score stage for this; rows that ended earlier (bad input, failed edit) stay as they ended.

Only the rules (`score.rules`, `score.per_task`) are taken from the other recipe; its scorer blocks are not run
(the new run dir's recipe keeps the scorers that computed the scores). A policy that needs a score the run did
not compute is refused with the list of missing scores. `refilter.json` / `refilter.md` in the new run dir
say what changed: pairs added and removed per task and reason. With `--no-pack` the refilter stops there (the
new run dir then holds the re-decided rows and the diff); `python -m pipeline run --stage pack` on it writes the
shards, ledger and reports, as for any run whose score stage is complete.
"""
from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from filters.policy import rules_for
from manifests.commit import atomic_write_bytes
from manifests.fragments import first_occurrences, fragment_path, list_fragments, read_completion, write_fragment
from manifests.schema import LIVE, REJECTED, ROW_SCHEMA
from manifests.storage import StorePath, read_parquet, store_path
from pipeline.cluster import connect
from pipeline.recipe import Recipe, RecipeError, load_recipe, resolve_path
from pipeline.run import RECIPE_FILE, open_run_dir, pack_corpus, prepare_run_dir, recorded_recipe
from pipeline.stage_state import finish, stage_dir
from stages.base import MESSAGE_CHARS, StageContext
from stages.score import ABSENT_KEY, HEURISTIC_SCORES, SCORERS, ScoreStage, policy_verdict, thresholds_json, verdict

DIFF_JSON, DIFF_MD = "refilter.json", "refilter.md"


def refilter(run_dir: str, recipe_spec: str, out_dir: str, address: str | None = None, pack: bool = True) -> dict:
    """Write the re-filtered corpus into out_dir; returns the diff against the finished run. `pack=False` stops
    once the rows are re-decided and the diff written: the decision of a corpus of millions in about a minute,
    the shards (the bulk of the work: every accepted pair's bytes rewritten) left to `run --stage pack`."""
    source, out = open_run_dir(run_dir), open_run_dir(out_dir, "--out")
    recipe = _merged_recipe(source, recipe_spec, out)
    _check_scores(source, recipe)
    prepare_run_dir(recipe, out)
    start = time.perf_counter()
    connect(address, out)
    decisions = _redecide(source, out, recipe)
    if (balance := source / "balance.json").exists():  # the instruct stage's windows, unchanged by a policy
        atomic_write_bytes(out / balance.name, balance.read_bytes())
    diff = refilter_diff(decisions, source, out, recipe_spec)
    atomic_write_bytes(out / DIFF_JSON, json.dumps(diff, indent=1, ensure_ascii=False).encode())
    atomic_write_bytes(out / DIFF_MD, diff_markdown(diff).encode())
    print(diff_markdown(diff))
    if pack:
        ctx = StageContext(seed=recipe.seed, recipe_hash=recipe.hash(), run_dir=str(out))
        pack_corpus(recipe, ctx, out, "refilter", start)
    else:
        print(f"[x2edit] re-decided in {time.perf_counter() - start:.1f} s, not packed. Shards, ledger and reports "
              f"(on a cluster too, as a Ray job): python -m pipeline run --stage pack --run-dir {out}")
    return diff


def _merged_recipe(source: StorePath, recipe_spec: str, out: StorePath) -> Recipe:
    """The finished run's recipe with the other recipe's rules: what the new corpus was made with."""
    original = recorded_recipe(source)
    if original is None or not read_completion(stage_dir(source, "score")):
        raise RecipeError(f"{source}: not a finished run (needs {RECIPE_FILE} and a completed score stage, "
                          "stages/score/COMPLETE.json); finish it with `python -m pipeline run` first")
    if out == source:
        raise RecipeError(f"--out {out} is the run being re-filtered; give a new run dir")
    other = load_recipe(recipe_spec)
    ignored = sorted(set(other.score.scorers) ^ set(original.score.scorers))
    if ignored:
        print(f"[x2edit] refilter runs no scorer: scorer blocks {ignored} differ between "
              f"{resolve_path(recipe_spec)} and the run, which keeps its own")
    score = original.score.model_copy(update={"rules": other.score.rules, "per_task": other.score.per_task})
    return original.model_copy(update={"score": score, "resources": other.resources})


def _check_scores(source: StorePath, recipe: Recipe) -> None:
    """Refuse a policy that reads a score no row of the run has and no scorer of the run writes (the heuristics
    always run: their names count as computed, so the rows are read only for other names)."""
    needed = {s for rule in [*recipe.score.rules, *(r for rs in recipe.score.per_task.values() for r in rs)]
              for s in rule.scores}
    computed = {*HEURISTIC_SCORES,
                *(name for cfg in recipe.score.scorers.values() for name in SCORERS[cfg.backend].names)}
    for path in list_fragments(stage_dir(source, "score")) if needed - computed else []:  # rows only if need be
        scores = read_parquet(path, ["scores"])["scores"]
        for text in pc.unique(scores).to_pylist():
            computed.update(json.loads(text or "{}"))
    if missing := sorted(needed - computed):
        raise RecipeError(f"the policy needs scores this run did not compute: {', '.join(missing)} "
                          f"(computed: {', '.join(sorted(computed))}); add the scorers and rerun the pipeline")


REDECIDE_GROUP = 64  # source fragments re-decided into one: a commit (two fsyncs) per group, not per fragment
MIN_GROUPS = 16  # fewer fragments per group rather than fewer tasks than a few cores can share


def _redecide(source: StorePath, out: StorePath, recipe: Recipe) -> pa.Table:
    """The committed score-stage fragments, re-decided as Ray tasks, a group of fragments into one fragment
    (named by its units, so a killed refilter resumes at the groups not yet committed); returns each unit's
    decision after and before (redecide_group's table, one row per unit id: its first copy, as read_units)."""
    import ray.data

    paths = list_fragments(stage_dir(source, "score"))
    size = max(1, min(REDECIDE_GROUP, len(paths) // MIN_GROUPS))  # a function of the fragments: resumable
    groups = [{"group": g, "paths": [str(p) for p in paths[i:i + size]]}
              for g, i in enumerate(range(0, len(paths), size))]
    parts = []
    if groups:
        ds = ray.data.from_items(groups, override_num_blocks=len(groups))
        ds = ds.map_batches(redecide_group, fn_kwargs={"out": str(stage_dir(out, "score")), "recipe": recipe},
                            batch_size=1, batch_format="pyarrow", num_cpus=0.5)
        with tqdm(total=len(groups), desc="refilter: fragment groups", unit="group") as bar:
            for part in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                parts.append(part)
                bar.update(len(pc.unique(part["group"])))
    empty = ROW_SCHEMA.empty_table()
    table = pa.concat_tables(parts).unify_dictionaries() if parts else _decisions(empty, 0, empty)
    del parts  # the tasks' blocks, in the order they finished: put back in fragment-name order, deduplicated
    table = table.take(pc.sort_indices(table, [("group", "ascending"), ("row", "ascending")]))
    first = first_occurrences(table["unit_id"])
    finish(out, "score")
    return table if first is None else table.take(first)


def redecide_group(batch: pa.Table, out: str, recipe: Recipe) -> pa.Table:
    """One group of fragments (a row of `batch`) re-decided into one fragment, unless it is committed (a
    resumed refilter); returns its rows' decisions (`_decisions`): the diff needs no second read of the rows."""
    paths = batch.column("paths")[0].as_py()
    table = pa.concat_tables(read_parquet(store_path(p)) for p in paths)
    decided = redecide_table(table, recipe)
    if not fragment_path(store_path(out), table["unit_id"].to_pylist()).exists():
        write_fragment(store_path(out), decided)
    return _decisions(decided, batch.column("group")[0].as_py(), table)


def _decisions(after: pa.Table, group: int, before: pa.Table) -> pa.Table:
    """Per row: where it lies (group, row), unit id, task, and its decision after and before (a reason;
    accepted: live)."""
    columns = {"group": pa.array(np.full(after.num_rows, group, np.int32)),
               "row": pa.array(np.arange(after.num_rows, dtype=np.int32)),
               "unit_id": after["unit_id"], "task": pc.dictionary_encode(after["task"])}  # labels: 4 B a row
    for suffix, rows in (("", after), ("_before", before)):
        columns.update({f"reason{suffix}": pc.dictionary_encode(rows["reason"]),
                        f"accepted{suffix}": pc.equal(rows["status"], LIVE)})
    return pa.table(columns)


JUDGED = ("status", "stage", "reason", "message", "thresholds")  # the columns a verdict sets


def redecide_table(table: pa.Table, recipe: Recipe) -> pa.Table:
    """`redecide` over a table: the columns a verdict sets, replaced in the rows it judges. Only the columns a
    verdict reads or sets become Python values; every other one (the images among them) stays as it is.
    `redecide` is its naive reference (tests/test_refilter_groups.py: they agree row for row)."""
    status, stage = table["status"], table["stage"]
    was_judged = pc.and_kleene(pc.and_kleene(pc.equal(status, REJECTED), pc.equal(stage, ScoreStage.name)),
                               pc.is_valid(table["src"]))
    judged = pc.fill_null(pc.or_kleene(pc.equal(status, LIVE), was_judged), False)
    index = np.flatnonzero(judged.to_numpy(zero_copy_only=False))
    columns = {name: table[name].to_pylist() for name in JUDGED}
    tasks, texts, provenance = (table[name].to_pylist() for name in ("task", "scores", "provenance"))
    rules, needs = {}, {}  # per task: its rules; the scores they read and the thresholds json
    for i in index.tolist():
        task = tasks[i]
        if task not in rules:
            rules[task] = rules_for(task, recipe.score.rules, recipe.score.per_task)
            needs[task] = (set().union(*(r.scores for r in rules[task])), thresholds_json(rules[task]))
        scores = json.loads(texts[i] or "{}")
        # why a score is absent matters only when a rule needs it: the provenance is parsed for those rows alone
        absent = json.loads(provenance[i] or "{}").get(ABSENT_KEY, {}) if needs[task][0] - scores.keys() else {}
        reason, message = verdict(scores, rules[task], absent)
        values = (LIVE, None, None, None) if reason is None else \
            (REJECTED, ScoreStage.name, reason, message[:MESSAGE_CHARS])
        for name, value in zip(JUDGED, (*values, needs[task][1])):
            columns[name][i] = value
    for name, values in columns.items():
        field = table.schema.field(name)
        table = table.set_column(table.schema.get_field_index(name), field, pa.array(values, field.type))
    return table


def redecide(row: dict, recipe: Recipe, images: bool) -> dict:
    """A row the score policy judged (accepted, or rejected with its images kept: `images`), judged again under
    the recipe's rules; any other row as it ended. The naive reference of `redecide_table`, one row at a time.
    The row comes without its images: no rule reads them, and a row rejected here gets no thumbnail (a report
    makes it from the kept images: manifests.inspect.ended_rows)."""
    judged = row["status"] == LIVE or (row["status"] == REJECTED and row["stage"] == ScoreStage.name and images)
    if not judged:
        return row
    reopened = {**row, "status": LIVE, "stage": None, "reason": None, "message": None}
    absent = json.loads(row["provenance"] or "{}").get(ABSENT_KEY, {})
    return policy_verdict(reopened, rules_for(row["task"], recipe.score.rules, recipe.score.per_task), absent)


def refilter_diff(both: pa.Table, before_dir: StorePath, after_dir: StorePath, recipe_spec: str) -> dict:
    """Pairs accepted in one corpus and not the other, per task and the reason of the side that rejected.
    `both`: each unit's decision after (reason, accepted) and before (reason_before, accepted_before)."""
    def rows(changed: pa.Array, reason: str) -> list[dict]:
        groups = both.filter(changed).group_by(["task", reason]).aggregate([([], "count_all")]).to_pylist()
        counts = sorted((((g["task"], g[reason]), g["count_all"]) for g in groups), key=str)
        return [{"task": t, "reason": r, "pairs": n} for (t, r), n in counts]

    was, now = both["accepted_before"], both["accepted"]
    return {"from": str(before_dir), "to": str(after_dir), "recipe": str(resolve_path(recipe_spec)),
            "accepted_before": pc.sum(was).as_py() or 0, "accepted_after": pc.sum(now).as_py() or 0,
            "added": rows(pc.and_(now, pc.invert(was)), "reason_before"),
            "removed": rows(pc.and_(was, pc.invert(now)), "reason")}


def diff_markdown(diff: dict) -> str:
    lines = [f"# refilter: {diff['from']} → {diff['to']}", "",
             f"Policy of {diff['recipe']}. Accepted pairs: {diff['accepted_before']} → {diff['accepted_after']}.",
             ""]
    for what, side in (("added", "reason they were rejected"), ("removed", "reason they are rejected now")):
        lines += [f"## {what.capitalize()} ({sum(r['pairs'] for r in diff[what])})", "",
                  f"| task | {side} | pairs |", "|---|---|---:|"]
        lines += [f"| {r['task']} | {r['reason']} | {r['pairs']} |" for r in diff[what]] or ["| – | – | 0 |"]
        lines.append("")
    return "\n".join(lines)
