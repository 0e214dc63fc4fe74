"""Engine overhead: the same N samples through the full engine with identity stages (Ray Data actor pools,
column contracts, fragment commits, resume bookkeeping, the pack stage's shards + manifests + ledger) vs a
plain single-process webdataset read → write loop. Reported per size as samples/s, their ratio, and the peak
memory of the whole process tree while each runs (PSS and RSS sums: the driver and, for the engine, the
embedded Ray cluster's processes — `bench/memory.py`); the plain loop runs in a fresh process of its own.

    python -m bench.engine_overhead                  # sizes 1000 4000 16000; stages apart and colocated
    python -m bench.engine_overhead --sizes 500 2000 --breakdown   # + memory per process kind at the peak
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.memory import TreeMemory
from manifests.inputs import InputUnit, read_unit
from manifests.schema import LIVE, empty_row
from stages.base import Stage, StageContext, StageGroup, to_table

SAMPLES_PER_TAR = 1000


def make_inputs(directory: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    jpegs = []
    for _ in range(16):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        jpegs.append(buf.getvalue())
    paths = []
    for t, start in enumerate(range(0, n, SAMPLES_PER_TAR)):
        path = directory / f"in-{t:04d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(start, min(n, start + SAMPLES_PER_TAR)):
                for ext, data in (("jpg", jpegs[i % 16]), ("json", json.dumps({"i": i}).encode()), ("txt", b"cap")):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def units_in(tars: list[Path], suffix: str = ".jpg") -> list[str]:
    return [k for p in tars for k in tarfile.open(p).getnames() if k.endswith(suffix)]


def plain_loop(inputs: list[Path], out: Path, shard_size: int) -> None:
    import webdataset as wds  # here, not at the top: it imports torch, which the engine's driver does not

    out.mkdir(parents=True)
    with wds.ShardWriter(str(out / "plain-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for sample in wds.WebDataset([str(p) for p in inputs], shardshuffle=False):
            sink.write({"__key__": sample["__key__"], "src.jpg": sample["jpg"], "edited.jpg": sample["jpg"],
                        "json": sample["json"]})


def _timed_plain(inputs: list[Path], out: Path, shard_size: int, result) -> None:
    t0 = time.perf_counter()
    plain_loop(inputs, out, shard_size)
    result.put(time.perf_counter() - t0)


def plain_run(inputs: list[Path], out: Path, shard_size: int) -> tuple[float, TreeMemory]:
    """The plain loop in a fresh process (not the driver, which holds Ray): its seconds (start-up not
    counted) and its memory."""
    spawn = multiprocessing.get_context("spawn")
    result = spawn.Queue()
    proc = spawn.Process(target=_timed_plain, args=(inputs, out, shard_size, result))
    proc.start()
    with TreeMemory([proc.pid]) as mem:
        seconds = result.get()
        proc.join()
    return seconds, mem


class RawSource(Stage):
    """Reads tar members without decoding and fills the pair fields the pack stage needs."""

    name = "source"

    def __call__(self, batch):
        for unit in batch.to_pylist():
            rows = []
            for raw in read_unit(InputUnit("webdataset", unit["uri"], unit["index"]), max_member_bytes=1 << 26):
                row = empty_row()
                row.update(unit_id=raw.sample_id, sample_id=raw.sample_id, pair_id=raw.sample_id, fanout=1,
                           status=LIVE, source_uri=raw.source_uri, src=raw.image, edited=raw.image,
                           task="other", task_id=0, op="identity", params="{}", instruction_en="-",
                           instruction_zh="-", seed=0, editor="identity", provenance="{}", scores="{}",
                           source_meta=json.dumps(raw.meta), width=0, height=0)
                rows.append(row)
                if len(rows) == 256:
                    yield to_table(rows)
                    rows = []
            if rows:
                yield to_table(rows)


class Identity(Stage):
    """Passes rows on unchanged, through the full stage contract (checks, timing, Arrow round trip)."""

    def process(self, rows: list[dict]) -> list[dict]:
        return rows


IDENTITIES = {s: type(f"Identity{s.title()}", (Identity,), {"name": s}) for s in ("instruct", "edit", "score")}


def engine_run(inputs: list[Path], run_dir: Path, shard_size: int, colocate: bool) -> None:
    import ray.data

    from manifests.ledger import write_ledger
    from manifests.storage import store_path
    from pipeline import engine
    from pipeline.recipe import parse_recipe
    from pipeline.stage_state import completion_records

    recipe = parse_recipe({"name": "bench", "commit_rows": 1000, "pack": {"shard_size": shard_size},
                           "resources": {s: {"batch_size": 256, "max_actors": 1, "num_cpus": 0.25}
                                         for s in ("instruct", "edit", "score")}})
    ctx = StageContext(seed=0, recipe_hash=recipe.hash(), run_dir=str(run_dir))
    units = [{"uri": str(p), "index": i} for i, p in enumerate(inputs)]
    ds = engine.apply_stage(ray.data.from_items(units, override_num_blocks=len(units)), RawSource, None, ctx,
                            recipe.resources.source)
    if colocate:  # the three stages in one actor pool, as `resources.colocate` does
        ds = engine.apply_stage(ds, StageGroup, [(cls, None, {}) for cls in IDENTITIES.values()], ctx,
                                recipe.resources.instruct)
    else:
        for stage, cls in IDENTITIES.items():
            ds = engine.apply_stage(ds, cls, None, ctx, getattr(recipe.resources, stage))
    root = store_path(run_dir)
    engine.sink(ds, engine.stage_dir(root, "score"), recipe.commit_rows)
    rows, shard_of, _ = engine.run_pack(recipe, ctx, root)
    write_ledger(root, engine.stage_dir(root, "score"), rows, shard_of, completion_records(root))
    written = len(units_in(sorted((run_dir / "shards").glob("*.tar")), ".src.jpg"))
    packed = len(shard_of) - shard_of.null_count
    if written != len(units_in(inputs)) or packed != written:
        raise RuntimeError(f"engine lost samples: {written} written, {packed} of {len(shard_of)} units packed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--breakdown", action="store_true", help="memory per process kind at each engine peak")
    args = parser.parse_args()
    from pipeline.cluster import connect

    connect()
    with TreeMemory() as idle:
        time.sleep(2)
    print(f"idle embedded cluster: PSS {idle.peak_pss / 2**30:.2f} GiB, RSS sum {idle.peak_rss / 2**30:.2f} GiB")
    if args.breakdown:
        print(idle.table())
    gib = "PSS/RSS GiB"
    print(f"{'N':>7} {'plain/s':>8} {gib:>11} {'engine/s':>9} {'ratio':>5} {gib:>11} "
          f"{'colocated/s':>11} {'ratio':>5} {gib:>11}")
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            inputs = make_inputs(tmp, n)
            seconds, plain_mem = plain_run(inputs, tmp / "plain", args.shard_size)
            runs = []
            for colocate in (False, True):
                with TreeMemory() as mem:
                    t0 = time.perf_counter()
                    engine_run(inputs, tmp / ("colocated" if colocate else "engine"), args.shard_size, colocate)
                    runs.append((n / (time.perf_counter() - t0), mem))
        plain = n / seconds
        cells = [f"{plain:>8.0f} {_mem(plain_mem)}"]
        cells += [f"{rate:>{w}.0f} {rate / plain:>5.2f} {_mem(mem)}" for (rate, mem), w in zip(runs, (9, 11))]
        print(f"{n:>7} " + " ".join(cells), flush=True)
        if args.breakdown:
            for (_, mem), what in zip(runs, ("engine", "colocated")):
                print(f"  {what} at its peak (object store's peak: {mem.peak_store / 2**20:.0f} MiB allocated):")
                print(mem.table())


def _mem(mem: TreeMemory) -> str:
    return f"{mem.peak_pss / 2**30:>5.2f}/{mem.peak_rss / 2**30:<5.2f}"


if __name__ == "__main__":
    main()
