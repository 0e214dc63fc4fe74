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
say what changed: pairs added and removed per task and reason.
"""
from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
from tqdm import tqdm

from filters.policy import rules_for
from manifests.commit import atomic_write_bytes
from manifests.fragments import list_fragments, read_completion, read_units, write_fragment
from manifests.schema import ACCEPTED, LIVE, REJECTED
from pipeline.cluster import connect
from pipeline.recipe import Recipe, RecipeError, load_recipe, resolve_path
from pipeline.run import RECIPE_FILE, local_run_dir, pack_corpus, prepare_run_dir
from pipeline.stage_state import finish, stage_dir
from stages.base import StageContext, to_table
from stages.score import ABSENT_KEY, SCORERS, ScoreStage, policy_verdict

DIFF_JSON, DIFF_MD = "refilter.json", "refilter.md"


def refilter(run_dir: str, recipe_spec: str, out_dir: str, address: str | None = None) -> dict:
    """Write the re-filtered corpus into out_dir; returns the diff against the finished run."""
    source, out = local_run_dir(run_dir), local_run_dir(out_dir, "--out")
    recipe = _merged_recipe(source, recipe_spec, out)
    _check_scores(source, recipe)
    prepare_run_dir(recipe, out)
    start = time.perf_counter()
    _redecide(source, out, recipe)
    if (balance := source / "balance.json").exists():  # the instruct stage's windows, unchanged by a policy
        shutil.copyfile(balance, out / balance.name)
    connect(address, out)
    ctx = StageContext(seed=recipe.seed, recipe_hash=recipe.hash(), run_dir=str(out))
    pack_corpus(recipe, ctx, out, "refilter", start)
    diff = ledger_diff(source, out, recipe_spec)
    atomic_write_bytes(out / DIFF_JSON, json.dumps(diff, indent=1, ensure_ascii=False).encode())
    atomic_write_bytes(out / DIFF_MD, diff_markdown(diff).encode())
    print(diff_markdown(diff))
    return diff


def _merged_recipe(source: Path, recipe_spec: str, out: Path) -> Recipe:
    """The finished run's recipe with the other recipe's rules: what the new corpus was made with."""
    recorded = source / RECIPE_FILE
    if not recorded.exists() or not read_completion(stage_dir(source, "score")):
        raise RecipeError(f"{source}: not a finished run (needs {RECIPE_FILE} and a completed score stage, "
                          "stages/score/COMPLETE.json); finish it with `python -m pipeline run` first")
    if out == source:
        raise RecipeError(f"--out {out} is the run being re-filtered; give a new run dir")
    original = Recipe.model_validate(json.loads(recorded.read_text())["recipe"])
    other = load_recipe(recipe_spec)
    ignored = sorted(set(other.score.scorers) ^ set(original.score.scorers))
    if ignored:
        print(f"[x2edit] refilter runs no scorer: scorer blocks {ignored} differ between "
              f"{resolve_path(recipe_spec)} and the run, which keeps its own")
    score = original.score.model_copy(update={"rules": other.score.rules, "per_task": other.score.per_task})
    return original.model_copy(update={"score": score, "resources": other.resources})


def _check_scores(source: Path, recipe: Recipe) -> None:
    """Refuse a policy that reads a score no row of the run has and no scorer of the run writes."""
    needed = {s for rule in [*recipe.score.rules, *(r for rs in recipe.score.per_task.values() for r in rs)]
              for s in rule.scores}
    computed = {name for cfg in recipe.score.scorers.values() for name in SCORERS[cfg.backend].names}
    for path in list_fragments(stage_dir(source, "score")):
        for scores in pq.read_table(path, columns=["scores"]).column("scores").to_pylist():
            computed.update(json.loads(scores or "{}"))
    if missing := sorted(needed - computed):
        raise RecipeError(f"the policy needs scores this run did not compute: {', '.join(missing)} "
                          f"(computed: {', '.join(sorted(computed))}); add the scorers and rerun the pipeline")


def _redecide(source: Path, out: Path, recipe: Recipe) -> None:
    """Each committed score-stage fragment, re-decided into a fragment of the same units (and name, so a
    killed refilter resumes where it stopped)."""
    done = {p.name for p in list_fragments(stage_dir(out, "score"))}
    todo = [p for p in list_fragments(stage_dir(source, "score")) if p.name not in done]
    for path in tqdm(todo, desc="refilter: fragments", unit="fragment"):
        rows = [redecide(row, recipe) for row in pq.read_table(path).to_pylist()]
        write_fragment(stage_dir(out, "score"), to_table(rows))
    finish(out, "score")


def redecide(row: dict, recipe: Recipe) -> dict:
    """A row the score policy judged (accepted, or rejected with its images kept), judged again under the
    recipe's rules; any other row as it ended."""
    judged = row["status"] == LIVE or (row["status"] == REJECTED and row["stage"] == ScoreStage.name
                                       and row["src"] is not None)
    if not judged:
        return row
    reopened = {**row, "status": LIVE, "stage": None, "reason": None, "message": None}
    absent = json.loads(row["provenance"] or "{}").get(ABSENT_KEY, {})
    return policy_verdict(reopened, rules_for(row["task"], recipe.score.rules, recipe.score.per_task), absent)


def ledger_diff(before_dir: Path, after_dir: Path, recipe_spec: str) -> dict:
    """Pairs accepted in one corpus and not the other, per task and the reason of the side that rejected."""
    def decisions(run: Path) -> dict[str, tuple[str, str, str]]:
        """From the committed score-stage rows, which the ledger is built from (a live row is accepted)."""
        t = read_units(stage_dir(run, "score"), columns=["unit_id", "status", "task", "reason"]).to_pydict()
        return {u: (ACCEPTED if s == LIVE else s, task, r)
                for u, s, task, r in zip(t["unit_id"], t["status"], t["task"], t["reason"])}

    before, after = decisions(before_dir), decisions(after_dir)
    added, removed = Counter(), Counter()
    for unit, (status, task, reason) in after.items():
        was, _, old_reason = before.get(unit, (None, None, None))
        if status == ACCEPTED and was != ACCEPTED:
            added[(task, old_reason)] += 1
        elif was == ACCEPTED and status != ACCEPTED:
            removed[(task, reason)] += 1
    accepted = [sum(s == ACCEPTED for s, _, _ in d.values()) for d in (before, after)]

    def rows(counts: Counter) -> list[dict]:
        return [{"task": t, "reason": r, "pairs": n} for (t, r), n in sorted(counts.items(), key=str)]

    return {"from": str(before_dir), "to": str(after_dir), "recipe": str(resolve_path(recipe_spec)),
            "accepted_before": accepted[0], "accepted_after": accepted[1],
            "added": rows(added), "removed": rows(removed)}


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
