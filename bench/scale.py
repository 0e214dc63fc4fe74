"""Scale: a synthetic finished run of N units, and what packing, inspecting and re-filtering it cost.

    python -m bench.scale pack-io --pairs 20000 [--fragment-rows 64]   # bytes the pack reads/writes per shard byte
    python -m bench.scale make --units 1000000 --dir runs/scale-1m      # a finished run: fragments, shards, ledger
    python -m bench.scale measure --dir runs/scale-1m                   # wall s and driver peak RSS per operation
    python -m bench.scale measure --dir runs/scale-1m --only refilter-decide refilter-pack

The run is real score-stage fragments (`commit_rows` rows each, the recipe default 64) of tiny images (16×16
JPEGs, reused) with text columns of realistic length, a completion record, and then the pipeline's own pack,
ledger and reports (`pipeline.run.pack_corpus` on an embedded Ray cluster). Outcomes: 3 % of the samples end at
the source, the rest fan out into two pairs each; of the pairs ~72 % are accepted, 18 % rejected by the score
policy (images kept, as the score stage keeps them), 10 % ended earlier (thumbnail only). `measure` runs each
operation in a fresh process and reports its wall time and peak RSS (ru_maxrss: the driver; Ray's workers,
used by the refilter's pack, are other processes).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from manifests.schema import FAILED, LIVE, REJECTED, empty_row, make_pair_id
from manifests.taxonomy import task_by_name

TASKS = {"subject_removal": 0.14, "subject_addition": 0.12, "style_change": 0.14, "background_change": 0.1,
         "color_change": 0.12, "material_change": 0.06, "action_change": 0.04, "tone_transformation": 0.1,
         "camera_movement": 0.04, "low_level": 0.1, "reasoning_edit": 0.04}
REGION_TASKS = {"subject_removal", "subject_addition", "color_change", "material_change"}
SCORES = ("change_global", "change_inside", "change_outside", "detail_change_outside", "aesthetic", "clip_t")
RULES = json.dumps([{"score": "change_global", "min": 0.01, "reason": "no_op_edit"},
                    {"score": "change_outside", "max": 0.05, "reason": "background_changed"},
                    {"score": "aesthetic", "min": 4.5, "reason": "low_aesthetic"}])
PROVENANCE = json.dumps({"source": {"worker": "webdataset", "version": "0.2"},
                         "instruct": {"worker": "template", "version": "1", "seed": 0},
                         "edit": {"worker": "classical-opencv", "version": "4.10", "op": "hsv_shift"},
                         "score": {"workers": ["heuristics", "aesthetic-v2.5", "clip"]},
                         "recipe_hash": "0123456789abcdef"})
TIGHT_POLICY = {"name": "tight", "score": {"rules": [{"score": "change_global", "min": 0.05, "reason": "no_op_edit"}]}}


def _pair_row(rng, sample: str, position: int, fanout: int, task: str, images: list[bytes], masks: list[bytes],
              thumb: bytes) -> dict:
    seed = int(rng.integers(1 << 31))
    pair = make_pair_id(sample, task, seed, "classical")
    scores = {s: round(float(rng.uniform(0, 1)), 6) for s in SCORES}
    fate = rng.uniform()
    row = {**empty_row(), "unit_id": pair, "pair_id": pair, "sample_id": sample, "fanout": fanout, "status": LIVE,
           "warnings": [], "source_uri": f"s3://corpus/images/{sample}.jpg", "position": position,
           "source_meta": json.dumps({"caption": f"a photo of scene {sample} with a few objects"}),
           "width": 16, "height": 16, "task": task, "task_id": task_by_name(task).id, "op": "hsv_shift",
           "params": json.dumps({"hue": round(float(rng.uniform(-1, 1)), 3), "strength": 0.5}), "seed": seed,
           "instruction_en": f"Change the colour of the object on the left to blue, variant {seed % 9973}",
           "instruction_zh": f"把左边物体的颜色改成蓝色 {seed % 9973}", "editor": "classical",
           "provenance": PROVENANCE, "scores": json.dumps(scores), "thresholds": RULES,
           "src": images[seed % len(images)], "edited": images[(seed + 1) % len(images)],
           "mask": masks[seed % 2] if task in REGION_TASKS else None,
           **{f"t_{s}": 0.01 for s in ("source", "instruct", "edit", "score")}}
    if fate < 0.18:  # the score policy's rejection keeps the images, for refilter
        return {**row, "status": REJECTED, "stage": "score", "reason": "low_aesthetic",
                "message": "aesthetic 3.9 < 4.5", "thumb": thumb}
    if fate < 0.28:  # ended before the score stage: no images, a thumbnail
        return {**row, "status": FAILED, "stage": "edit", "reason": "ValueError", "message": "empty mask at edit.py:88",
                "thumb": thumb, "src": None, "edited": None, "mask": None, "scores": "{}", "thresholds": None}
    return row


def synthesise(run_dir: Path, units: int, fragment_rows: int = 64, seed: int = 0) -> None:
    """A completed score stage of `units` units under run_dir (default-cpu recipe, two pack actors)."""
    from manifests.fragments import fragment_bytes, fragment_path
    from manifests.images import contact_thumb, encode_jpeg, encode_mask
    from pipeline.recipe import load_recipe
    from pipeline.run import prepare_run_dir
    from pipeline.stage_state import finish, stage_dir
    from stages.base import Resources, to_table
    from stages.source import POSITION_STRIDE

    rng = np.random.default_rng(seed)
    recipe = load_recipe("default-cpu")
    resources = recipe.resources.model_copy(update={"pack": Resources(num_cpus=0.5, max_actors=2, batch_size=1)})
    prepare_run_dir(recipe.model_copy(update={"resources": resources}), run_dir)
    images = [encode_jpeg(rng.integers(0, 255, (16, 16, 3), np.uint8)) for _ in range(16)]
    masks = [encode_mask(rng.uniform(size=(16, 16)) < 0.3) for _ in range(2)]
    thumb = contact_thumb(images[:2], height=16)
    out = stage_dir(run_dir, "score")
    out.mkdir(parents=True, exist_ok=True)
    names, shares = list(TASKS), np.array(list(TASKS.values())) / sum(TASKS.values())
    rows, index, samples = [], 0, 0
    while index < units:
        sample, position, samples = f"s{samples:09d}", samples * POSITION_STRIDE, samples + 1
        if rng.uniform() < 0.03 or units - index - len(rows) < 2:
            rows.append({**empty_row(), "unit_id": sample, "sample_id": sample, "fanout": 1, "status": REJECTED,
                         "stage": "source", "reason": "too_small", "message": "8x8 < 64 px", "warnings": [],
                         "source_uri": f"s3://corpus/images/{sample}.jpg", "position": position})
        else:
            for task in rng.choice(names, size=2, replace=False, p=shares):
                rows.append(_pair_row(rng, sample, position, 2, str(task), images, masks, thumb))
        if len(rows) >= fragment_rows or index + len(rows) >= units:
            table = to_table(rows)  # written whole, without the commit protocol's fsync: same bytes, faster
            fragment_path(out, table.column("unit_id").to_pylist()).put(fragment_bytes(table))
            index, rows = index + len(rows), []
    finish(run_dir, "score")


def make(run_dir: Path, units: int, fragment_rows: int) -> dict:
    """Synthesise, then pack with the pipeline's own code: shards, manifests, ledger, reports."""
    from pipeline.cluster import connect
    from pipeline.recipe import Recipe
    from pipeline.run import RECIPE_FILE, pack_corpus
    from stages.base import StageContext

    start = time.perf_counter()
    synthesise(run_dir, units, fragment_rows)
    made = time.perf_counter() - start
    recipe = Recipe.model_validate(json.loads((run_dir / RECIPE_FILE).read_text())["recipe"])
    connect()
    start = time.perf_counter()
    report = pack_corpus(recipe, StageContext(seed=recipe.seed, recipe_hash=recipe.hash(), run_dir=str(run_dir)),
                         run_dir, "synthetic", start)
    return {"units": units, "synthesise_s": round(made, 1), "pack_corpus_s": round(time.perf_counter() - start, 1),
            "accepted": report["accepted"], "shards": report["shards"]}


# -------------------------------------------------------------------------------------- pack I/O

def _io() -> dict[str, int]:
    """This process's read/written bytes through read()/write() syscalls, page-cache hits included."""
    return {k: int(v) for k, v in (line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())}


def pack_io(pairs: int, fragment_rows: int) -> dict:
    """The pack stage's jobs run in this process (no Ray), counting what they read and write."""
    from manifests.fragments import list_fragments, read_units
    from pipeline.stage_state import stage_dir
    from stages.base import StageContext
    from stages.pack import PLAN_COLUMNS, PackConfig, PackStage, RowReader, plan_shards

    root = Path(tempfile.mkdtemp(prefix="x2edit-bench-packio-"))
    try:
        synthesise(root, round(pairs / 0.72), fragment_rows)  # ~72 % of the units are accepted pairs
        rows_dir, out = stage_dir(root, "score"), root / "shards"
        out.mkdir()
        cfg = PackConfig(shard_size=100)
        start = time.perf_counter()
        plan = plan_shards(read_units(rows_dir, columns=list(PLAN_COLUMNS)), cfg)
        planned = time.perf_counter() - start
        stage = PackStage(cfg, StageContext(seed=0, recipe_hash="bench", run_dir=str(root)), str(rows_dir), str(out))
        jobs = plan.jobs(skip=set()).to_pylist()
        stage.write_job(jobs[0])  # warm-up (imports, PIL plugins); its shards are rewritten below
        before, logical, start = _io(), 0, time.perf_counter()
        for job in jobs:
            reader = RowReader(rows_dir, job["_fragment"], job["_row"])
            stage.write_job(job, reader)
            logical += reader.bytes_read
        wrote, after = time.perf_counter() - start, _io()
        committed = sum(p.size() for p in list_fragments(rows_dir))
        shard_bytes = sum(p.stat().st_size for p in out.iterdir())
        accepted = plan.order.num_rows
        return {"pairs": accepted, "fragment_rows": fragment_rows, "fragments_MB": round(committed / 1e6, 1),
                "shards_MB": round(shard_bytes / 1e6, 1), "plan_s": round(planned, 2), "write_s": round(wrote, 1),
                "read_syscall_per_fragment_byte": round((after["rchar"] - before["rchar"]) / committed, 3),
                "read_counted_per_fragment_byte": round(logical / committed, 3),
                "read_syscall_per_shard_byte": round((after["rchar"] - before["rchar"]) / shard_bytes, 3),
                "written_per_shard_byte": round((after["wchar"] - before["wchar"]) / shard_bytes, 3),
                "written_B_per_pair": round((after["wchar"] - before["wchar"]) / accepted),
                "shard_B_per_pair": round(shard_bytes / accepted),
                "fragment_B_per_pair": round(committed / accepted)}
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------------- operations

def plan_or_ledger(name: str, run_dir: Path) -> None:
    """The pack's driver work without its Ray jobs: read the rows and plan (and build and write the ledger)."""
    from manifests.fragments import read_units
    from manifests.ledger import write_ledger
    from pipeline.stage_state import completion_records, stage_dir
    from stages.pack import PLAN_COLUMNS, PackConfig, plan_shards

    rows = read_units(stage_dir(run_dir, "score"), columns=list(PLAN_COLUMNS))
    plan = plan_shards(rows, PackConfig(**json.loads((run_dir / "recipe.json").read_text())["recipe"]["pack"]))
    plan.jobs(skip=set())
    if name == "ledger":
        with tempfile.TemporaryDirectory() as scratch:
            write_ledger(Path(scratch), stage_dir(run_dir, "score"), rows, plan.shard_column(rows.num_rows),
                         completion_records(run_dir))


def commands(run_dir: Path, scratch: Path) -> dict[str, list[str]]:
    """Each operation as the command a user runs."""
    (scratch / "tight.yaml").write_text(json.dumps(TIGHT_POLICY))
    shards = [sys.executable, "-m", "manifests.cli"]
    refilter = [sys.executable, "-m", "pipeline", "refilter", "--run-dir", str(run_dir), "--recipe",
                str(scratch / "tight.yaml")]
    decided = scratch / "decided"
    return {"plan": [sys.executable, "-m", "bench.scale", "op", "plan", "--dir", str(run_dir)],
            "ledger": [sys.executable, "-m", "bench.scale", "op", "ledger", "--dir", str(run_dir)],
            "stats": [*shards, "stats", str(run_dir)], "validate": [*shards, "validate", str(run_dir)],
            "sample": [*shards, "sample", str(run_dir), "--decision", "any", "--where",
                       "score_change_global < 0.05 AND task = 'low_level'"],
            "report": [*shards, "report", str(run_dir), "--out", str(scratch / "report.html")],
            "refilter": [*refilter, "--out", str(scratch / "refiltered")],
            # decide now (rows re-decided, the diff), pack later: the decided run's pack stage
            "refilter-decide": [*refilter, "--out", str(decided), "--no-pack"],
            "refilter-pack": [sys.executable, "-m", "pipeline", "run", "--stage", "pack", "--run-dir", str(decided)]}


def measure(run_dir: Path, names: list[str]) -> list[dict]:
    """Wall time and peak RSS of each command, in a fresh process each (os.wait4: that child's own peak)."""
    out = []
    with tempfile.TemporaryDirectory(prefix="x2edit-bench-scale-") as scratch:
        for name, command in commands(run_dir, Path(scratch)).items():
            if name not in names:
                continue
            start = time.perf_counter()
            proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - start
            if status:
                raise RuntimeError(f"{name}: exit status {status}: {proc.stderr.read().decode()[-2000:]}")
            out.append({"operation": name, "wall_s": round(wall, 1), "peak_rss_MiB": round(usage.ru_maxrss / 1024)})
            print(out[-1], file=sys.stderr)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("pack-io", "make", "measure", "op"))
    parser.add_argument("name", nargs="?", help="op: the operation")
    parser.add_argument("--pairs", type=int, default=20_000)
    parser.add_argument("--units", type=int, default=100_000)
    parser.add_argument("--fragment-rows", type=int, default=64)
    parser.add_argument("--dir", type=Path)
    parser.add_argument("--only", nargs="*", default=["plan", "ledger", "stats", "validate", "sample", "report",
                                                          "refilter", "refilter-decide", "refilter-pack"])
    args = parser.parse_args()
    if args.command == "pack-io":
        print(json.dumps(pack_io(args.pairs, args.fragment_rows)))
    elif args.command == "make":
        print(json.dumps(make(args.dir, args.units, args.fragment_rows)))
    elif args.command == "op":
        plan_or_ledger(args.name, args.dir)
    else:
        units = json.loads((args.dir / "stages" / "score" / "COMPLETE.json").read_text())["units"]
        print("| operation | units | wall s | peak RSS MiB |\n|---|---:|---:|---:|")
        for r in measure(args.dir, args.only):
            print(f"| {r['operation']} | {units:,} | {r['wall_s']} | {r['peak_rss_MiB']} |")


if __name__ == "__main__":
    main()
