"""The engine: stages as Ray Data actor pools, stage outputs committed as fragments.

The fused run streams source → instruct → edit → score through `map_batches` actor pools (backpressure,
progress bars, actor restarts) and commits the last stage's rows as fragments. A per-stage job reads the
previous stage's committed fragments and commits its own, and starts only once that stage has recorded
that it finished the whole plan. Either way the pack stage reads `stages/score`.
"""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import ray.data
from ray.data import ActorPoolStrategy

from tqdm import tqdm

from manifests.commit import atomic_write_bytes, discard_uncommitted
from manifests.fragments import done_ids, list_fragments, read_units, write_fragment
from manifests.schema import COLUMNS, ROW_STAGES
from manifests.shards import committed_shards, discard_orphan_tars
from manifests.storage import StorePath, read_parquet, store_path
from pipeline.stage_state import finish, previous_stage, stage_dir
from stages.base import Resources, StageContext, StageGroup
from stages.edit import EditStage
from stages.instruct import InstructStage, window_weights
from stages.pack import PLAN_COLUMNS, PackStage, plan_shards
from stages.score import ScoreStage
from stages.source import POSITION_STRIDE, SourceStage, plan_units

BALANCE_FILE = "balance.json"  # closed loop: each window's weights and yield estimates
STAGE_CLASSES = {cls.name: cls for cls in (SourceStage, InstructStage, EditStage, ScoreStage)}
assert tuple(STAGE_CLASSES) == ROW_STAGES


def stage_config(recipe, stage: str):
    """The config a stage is built with: its own block, with the block it also reads."""
    joint = {"source": ("input", "source"), "instruct": ("instruct", "edit")}  # instruct routes to editors
    return tuple(getattr(recipe, block) for block in joint[stage]) if stage in joint else getattr(recipe, stage)


def apply_stage(ds: ray.data.Dataset, cls, cfg, ctx: StageContext, res: Resources, **kwargs) -> ray.data.Dataset:
    # Ray Data restarts a pool actor that dies and retries the batch it held (its default for actor
    # pools); the rows of a retried batch are deterministic, and readers drop duplicate unit ids.
    return ds.map_batches(
        cls, fn_constructor_kwargs={"cfg": cfg, "ctx": ctx, **kwargs}, batch_size=res.batch_size,
        batch_format="pyarrow", compute=ActorPoolStrategy(min_size=res.min_actors, max_size=res.max_actors),
        num_cpus=res.num_cpus, num_gpus=res.num_gpus or None, resources=res.resources or None)


def commit_fragments(batch: pa.Table, directory: str) -> pa.Table:
    path = write_fragment(store_path(directory), batch)
    return pa.table({"fragment": [path.name], "rows": [batch.num_rows]})


def sink(ds: ray.data.Dataset, out: StorePath, rows: int) -> int:
    out.mkdir(parents=True, exist_ok=True)
    written = ds.map_batches(commit_fragments, fn_kwargs={"directory": str(out)}, batch_size=rows,
                             batch_format="pyarrow", num_cpus=0.25)
    return sum(r["rows"] for r in written.iter_rows())


def source_dataset(recipe, ctx: StageContext, done: set[str], units: list[dict]) -> ray.data.Dataset:
    ds = ray.data.from_items(units, override_num_blocks=max(1, len(units)))
    return apply_stage(ds, SourceStage, stage_config(recipe, "source"), ctx, recipe.resources.source,
                       skip=frozenset(done))


def run_fused(recipe, ctx: StageContext, run_dir: StorePath) -> int:
    """source → instruct → edit → score streamed as one job (open loop), or one job per window of input units
    (closed-loop balancing: each window's task weights come from the committed outcomes of the earlier
    windows); returns the rows committed by this invocation."""
    out = stage_dir(run_dir, "score")
    units = plan_units(recipe.input)
    balance = recipe.instruct.balance
    if balance.mode == "open_loop":
        written = _chain(recipe, ctx, out, units, None)
    else:
        written, log, scored = 0, [], ScoredRows(out)
        for start in range(0, len(units), balance.window):
            window = units[start:start + balance.window]
            first = window[0]["index"] * POSITION_STRIDE  # the rows of units before the window
            earlier = [r for r in scored.refresh() if r["position"] is not None and r["position"] < first]
            weights, yields = window_weights(recipe.instruct, frozenset(recipe.edit.routes()), earlier, start,
                                             len(window))
            log.append({"window": len(log), "units": [u["index"] for u in window],
                        "weights": {t: round(w, 4) for t, w in sorted(weights.items())},
                        "yield_estimates": {t: round(y, 4) for t, y in sorted(yields.items())}})
            written += _chain(recipe, ctx, out, window, weights)
        atomic_write_bytes(run_dir / BALANCE_FILE, json.dumps(log, indent=1).encode())
    finish(run_dir, "score")  # the chain ran to its end over the whole input
    return written


class ScoredRows:
    """The committed score rows' (task, status, position), one per unit (the first copy, as `read_units`), each
    fragment read once however many windows ask. The earlier windows are all committed before a window starts,
    so a resumed run computes the same weights."""

    def __init__(self, directory: StorePath):
        self.directory, self.read, self.rows = directory, set(), {}

    def refresh(self) -> list[dict]:
        for path in list_fragments(self.directory):
            if path.name not in self.read:
                self.read.add(path.name)
                for row in read_parquet(path, ["unit_id", "task", "status", "position"]).to_pylist():
                    self.rows.setdefault(row["unit_id"], row)
        return list(self.rows.values())


def _chain(recipe, ctx: StageContext, out: StorePath, units: list[dict], weights: dict | None) -> int:
    ds = source_dataset(recipe, ctx, done_ids(out), units)
    together = recipe.resources.colocate
    extra = {"instruct": {"weights": weights}}  # the window's task weights (closed loop)
    for stage in ROW_STAGES[1:]:
        if stage in together[1:]:
            continue  # runs inside the group of together[0]
        if stage in together:
            members = [(STAGE_CLASSES[s], stage_config(recipe, s), extra.get(s, {})) for s in together]
            ds = apply_stage(ds, StageGroup, members, ctx, getattr(recipe.resources, stage))
        else:
            ds = apply_stage(ds, STAGE_CLASSES[stage], stage_config(recipe, stage), ctx,
                             getattr(recipe.resources, stage), **extra.get(stage, {}))
    return sink(ds, out, recipe.commit_rows)


def load_fragment_rows(batch: pa.Table) -> pa.Table:
    """Read the kept units of one fragment (the row lists come from the driver's dedup)."""
    tables = []
    for path, units in zip(batch.column("path").to_pylist(), batch.column("units").to_pylist()):
        tables.append(read_parquet(store_path(path), list(COLUMNS), filters=[("unit_id", "in", units)]))
    return pa.concat_tables(tables)


def run_stage(recipe, ctx: StageContext, run_dir: StorePath, stage: str) -> int:
    """One stage as its own job: previous stage's committed rows in, this stage's fragments out."""
    out = stage_dir(run_dir, stage)
    done = done_ids(out)
    if stage == "source":
        written = sink(source_dataset(recipe, ctx, done, plan_units(recipe.input)), out, recipe.commit_rows)
        finish(run_dir, stage)
        return written
    previous = stage_dir(run_dir, previous_stage(stage))
    todo = read_units(previous, columns=["unit_id"])
    by_fragment: dict[str, list[str]] = {}
    for unit, frag in zip(todo.column("unit_id").to_pylist(), todo.column("_fragment").to_pylist()):
        if unit not in done:
            by_fragment.setdefault(str(previous / frag), []).append(unit)
    written = 0
    if by_fragment:
        items = [{"path": p, "units": u} for p, u in sorted(by_fragment.items())]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(load_fragment_rows, batch_size=1, batch_format="pyarrow", num_cpus=0.25)
        ds = apply_stage(ds, STAGE_CLASSES[stage], stage_config(recipe, stage), ctx,
                         getattr(recipe.resources, stage))
        written = sink(ds, out, recipe.commit_rows)
    finish(run_dir, stage)
    return written


def run_pack(recipe, ctx: StageContext, run_dir: StorePath) -> tuple[pa.Table, pa.Array, list[dict]]:
    """Plan the shards and write the ones not yet committed; returns the score stage's units (read_units, the
    plan's columns), the shard of each (null for those that ended) and the committed shards' summaries."""
    rows_dir, out = stage_dir(run_dir, "score"), run_dir / "shards"
    rows = read_units(rows_dir, columns=list(PLAN_COLUMNS))
    plan = plan_shards(rows, recipe.pack)
    out.mkdir(parents=True, exist_ok=True)
    discard_uncommitted(out)
    discard_orphan_tars(out, recipe.pack.prefix)
    committed = committed_shards(out, recipe.pack.prefix)
    planned = {s["shard"]: s["plan_hash"] for s in plan.shards}
    for name, summary in committed.items():
        if summary.get("plan_hash") != planned.get(name):
            raise RuntimeError(f"committed shard {name} in {out} does not match this run's plan "
                               "(the run dir holds output of other inputs, or was packed by a version that "
                               "planned shards differently?); use a new run dir")
    jobs = plan.jobs(skip=set(committed))
    if jobs.num_rows:  # one job per window of the plan: it reads its rows once and writes its shards
        ds = ray.data.from_arrow([jobs.take([i]) for i in range(jobs.num_rows)])  # a block per job
        ds = apply_stage(ds, PackStage, recipe.pack, ctx, recipe.resources.pack,
                         rows_dir=str(rows_dir), out_dir=str(out))
        todo = pc.sum(pc.list_value_length(jobs["shards"])).as_py()
        for _ in tqdm(ds.iter_rows(), total=todo, desc="pack: shards", unit="shard"):
            pass
    shards = list(committed_shards(out, recipe.pack.prefix).values())
    return rows, plan.shard_column(rows.num_rows), shards
