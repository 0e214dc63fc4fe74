"""Where each stage of a run dir stands: which units it still owes, whether it may start, and its
completion record. Reads and writes files only (no Ray), so a job that must not start refuses before
Ray does."""
from __future__ import annotations

from pathlib import Path

from manifests.fragments import done_ids, mark_complete, plan_record, read_completion, read_units
from manifests.schema import STAGES
from manifests.storage import StorePath, store_path


class StageNotReady(RuntimeError):
    """A per-stage job was started before the stage it reads from had finished the whole plan."""


def previous_stage(stage: str) -> str:
    return STAGES[STAGES.index(stage) - 1]


def stage_dir(run_dir: Path | StorePath, stage: str) -> StorePath:
    return store_path(run_dir) / "stages" / stage


def unfinished(run_dir: Path | StorePath, stage: str) -> tuple[list[str], int]:
    """Units of the previous stage's committed output that `stage` has not committed yet, and how many
    units that output holds in all."""
    todo = read_units(stage_dir(run_dir, previous_stage(stage)), columns=["unit_id"]).column("unit_id").to_pylist()
    done = done_ids(stage_dir(run_dir, stage))
    return [u for u in todo if u not in done], len(todo)


def check_ready(run_dir: Path | StorePath, stage: str, command: str) -> None:
    """Refuse to start a stage before its predecessor has finished every unit of the plan: otherwise the
    units it has not reached yet would be missing from everything downstream, the ledger included.
    Reads files only, so it runs before Ray starts. `command` is the rerun command, with {stage} open."""
    if stage == "source" or read_completion(stage_dir(run_dir, previous := previous_stage(stage))):
        return
    committed = len(read_units(stage_dir(run_dir, previous), columns=["unit_id"]))
    if not committed:
        state = "it has not run"
    elif previous == "source":
        state = f"{committed} samples committed so far; it records completion once it has read every input"
    else:
        missing, total = unfinished(run_dir, previous)
        state = (f"{len(missing)} of the {total} units of stage {previous_stage(previous)!r} "
                 f"are not committed by it")
    raise StageNotReady(f"stage {stage!r} cannot start: stage {previous!r} has not finished ({state}); "
                        f"run first: {command.format(stage=previous)}")


def finish(run_dir: Path | StorePath, stage: str) -> None:
    """Record that `stage` holds the whole plan (after a per-stage job or, for 'score', the fused chain)."""
    if stage != "source" and (missing := unfinished(run_dir, stage)[0]):
        raise RuntimeError(f"stage {stage!r} ended with {len(missing)} units of stage {previous_stage(stage)!r} "
                           f"not committed (first: {missing[0]!r}); rerun it")
    out = stage_dir(run_dir, stage)
    mark_complete(out, {"stage": stage, **plan_record(read_units(out, columns=["unit_id", "sample_id"]))})


def completion_records(run_dir: Path | StorePath) -> dict[str, dict]:
    """The completion records of a run dir's stages, by stage (a fused run has only 'score')."""
    return {s: record for s in STAGES if (record := read_completion(stage_dir(run_dir, s)))}
