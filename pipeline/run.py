"""The run driver: prepare the run dir, run the fused pipeline or one stage, pack, ledger, report."""
from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from manifests.commit import atomic_write_bytes, discard_uncommitted
from manifests.fragments import list_fragments
from manifests.html_report import write_html_report
from manifests.ledger import read_ledger, write_ledger
from manifests.schema import STAGES
from manifests.storage import StorePath, store_path
from pipeline.cluster import connect
from pipeline.recipe import Recipe, RecipeError, load_recipe, resolve_path
from pipeline.report import REPORT_COLUMNS, build_report, write_report
from pipeline.stage_state import check_ready, completion_records, stage_dir
from stages.base import StageContext
from stages.instruct import target_shares, task_weights
from stages.source import plan_units

RECIPE_FILE = "recipe.json"
WALLS_FILE = "invocations.json"


def prepare_run_dir(recipe: Recipe, run_dir: Path | StorePath) -> None:
    """Record the resolved recipe and its hash; refuse to mix the output of two recipes in one run dir.
    Leftovers of killed writers are discarded: temporary files on a filesystem, tars without their manifest
    (in the pack), and nothing in an object store, where an upload a kill cut short leaves no object."""
    run_dir = store_path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    recorded = run_dir / RECIPE_FILE
    if recorded.exists():
        previous = json.loads(recorded.read_text())["hash"]
        if previous != recipe.hash():
            raise SystemExit(f"{run_dir} was built with recipe hash {previous}, this recipe is {recipe.hash()}; "
                             "use a new run dir (or the same recipe to resume)")
    else:
        body = {"hash": recipe.hash(), "recipe": json.loads(recipe.canonical_json())}
        atomic_write_bytes(recorded, json.dumps(body, indent=2, ensure_ascii=False).encode())
        atomic_write_bytes(run_dir / "recipe.yaml", yaml.safe_dump(body["recipe"], allow_unicode=True).encode())
    for stage in STAGES:
        removed = discard_uncommitted(run_dir / "stages" / stage)
        if removed:
            print(f"[x2edit] discarded {len(removed)} uncommitted leftovers of stage {stage}")
        committed = list_fragments(run_dir / "stages" / stage)
        if committed:
            print(f"[x2edit] resuming: stage {stage} has {len(committed)} committed fragments")


def _log_invocation(run_dir: StorePath, what: str, wall: float) -> list[dict]:
    path = run_dir / WALLS_FILE
    walls = json.loads(path.read_text()) if path.exists() else []
    walls.append({"what": what, "wall_s": round(wall, 3), "at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    atomic_write_bytes(path, json.dumps(walls, indent=1).encode())
    return walls


def check_inputs(recipe: Recipe, origin: str) -> None:
    """Plan the input before anything is created or started, so a wrong path is one line, not a traceback
    after Ray has started and a half-made run dir."""
    try:
        plan_units(recipe.input)
    except (ValueError, OSError) as e:
        raise RecipeError(f"{origin}: input.paths: {e}") from None


def recorded_recipe(run_dir: StorePath) -> Recipe | None:
    """The recipe a run dir was started with (its RECIPE_FILE), None for a run dir that records none."""
    recorded = run_dir / RECIPE_FILE
    return Recipe.model_validate(json.loads(recorded.read_text())["recipe"]) if recorded.exists() else None


def open_run_dir(run_dir: str, option: str = "--run-dir") -> StorePath:
    """The run dir: a local or shared-filesystem path, or an object-store URL (manifests/storage.py)."""
    try:
        root = store_path(run_dir)
        bucket = root.bucket()
        if bucket is None or bucket.exists():
            return root
    except (ValueError, OSError) as e:
        raise RecipeError(f"{option} {run_dir}: cannot open it ({e})") from None
    raise RecipeError(f"{option} {run_dir}: bucket {bucket.path!r} does not exist at the endpoint this process "
                      "uses (AWS_ENDPOINT_URL or the store's default); create it first")


def run(recipe_spec: str | None, run_dir: str, stage: str | None = None, address: str | None = None) -> dict | None:
    """The fused run (stage None) or one stage; returns the run report once the corpus is packed. Without a
    recipe, the one the run dir records (to resume a run or run its next stage)."""
    root = open_run_dir(run_dir)
    if recipe_spec is None:
        if (recipe := recorded_recipe(root)) is None:
            raise RecipeError(f"--recipe is needed: {root} records no recipe ({RECIPE_FILE}) to go on with")
        origin = str(root / RECIPE_FILE)
    else:
        recipe, origin = load_recipe(recipe_spec), str(resolve_path(recipe_spec))
    if stage == "instruct" and recipe.instruct.balance.mode == "closed_loop":
        raise RecipeError(f"{origin}: instruct.balance.mode: closed_loop needs the fused run "
                          "(each window's task weights come from the scored pairs of the earlier windows); run "
                          "without --stage, or use open_loop for per-stage jobs")
    if stage in (None, "source"):
        check_inputs(recipe, origin)
    else:
        named = f" --recipe {recipe_spec}" if recipe_spec else ""
        check_ready(root, stage, f"python -m pipeline run{named} --stage {{stage}} --run-dir {root}")
    prepare_run_dir(recipe, root)
    connect(address, root)  # before Ray is imported anywhere: an embedded cluster's settings are read at import
    from pipeline import engine

    ctx = StageContext(seed=recipe.seed, recipe_hash=recipe.hash(), run_dir=str(root))
    start = time.perf_counter()
    if stage is None:
        n = engine.run_fused(recipe, ctx, root)
        print(f"[x2edit] stages source→score committed {n} rows")
    elif stage != "pack":
        n = engine.run_stage(recipe, ctx, root, stage)
        print(f"[x2edit] stage {stage}: committed {n} rows")
        _log_invocation(root, stage, time.perf_counter() - start)
        return None
    return pack_corpus(recipe, ctx, root, stage or "fused", start)


def pack_corpus(recipe: Recipe, ctx: StageContext, root: StorePath, what: str, start: float) -> dict:
    """Pack the committed score-stage rows into shards, then the ledger and the reports (a run's last step,
    and the whole of a refilter's Ray work)."""
    from pipeline import engine

    units, shard_of, shards = engine.run_pack(recipe, ctx, root)
    write_ledger(root, stage_dir(root, "score"), units, shard_of, completion_records(root))
    ledger = read_ledger(root, list(REPORT_COLUMNS))
    walls = _log_invocation(root, what, time.perf_counter() - start)
    covered = frozenset(recipe.edit.routes())
    balance = root / engine.BALANCE_FILE
    report = build_report(recipe, ledger, shards, covered, target_shares(recipe.instruct, covered),
                          task_weights(recipe.instruct, covered), walls,
                          json.loads(balance.read_text()) if balance.exists() else [])
    print(write_report(root, report))
    print(f"[x2edit] HTML report: {write_html_report(root)}")
    return report
