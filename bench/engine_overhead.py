"""Engine overhead: the same N samples through the full engine with identity stages (Ray Data actor pools,
column contracts, fragment commits, resume bookkeeping, the pack stage's shards + manifests + ledger) vs a
plain single-process webdataset read → write loop. Reported as samples/s and their ratio, per size.

    python -m bench.engine_overhead                  # sizes 1000 4000 16000; stages apart and colocated
    python -m bench.engine_overhead --sizes 500 2000
"""
from __future__ import annotations

import argparse
import io
import json
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

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


def units_in(inputs: list[Path]) -> list[str]:
    return [k for p in inputs for k in tarfile.open(p).getnames() if k.endswith(".jpg")]


def plain_loop(inputs: list[Path], out: Path, shard_size: int) -> None:
    out.mkdir(parents=True)
    with wds.ShardWriter(str(out / "plain-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for sample in wds.WebDataset([str(p) for p in inputs], shardshuffle=False):
            sink.write({"__key__": sample["__key__"], "src.jpg": sample["jpg"], "edited.jpg": sample["jpg"],
                        "json": sample["json"]})


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

    from pipeline import engine
    from pipeline.recipe import parse_recipe

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
    engine.sink(ds, engine.stage_dir(run_dir, "score"), recipe.commit_rows)
    ledger, _ = engine.run_pack(recipe, ctx, run_dir)
    shards = sorted(str(p) for p in (run_dir / "shards").glob("*.tar"))
    written = sum(1 for _ in wds.WebDataset(shards, shardshuffle=False))
    if written != len(units_in(inputs)) or ledger.column("status").to_pylist().count("accepted") != written:
        raise RuntimeError(f"engine lost samples: {written} written, ledger {ledger.num_rows} rows")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--shard-size", type=int, default=1000)
    args = parser.parse_args()
    from pipeline.cluster import connect

    connect()
    print(f"{'N':>7} {'plain/s':>9} {'engine/s':>9} {'ratio':>6} {'colocated/s':>12} {'ratio':>6}")
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            inputs = make_inputs(tmp, n)
            t0 = time.perf_counter()
            plain_loop(inputs, tmp / "plain", args.shard_size)
            t1 = time.perf_counter()
            engine_run(inputs, tmp / "engine", args.shard_size, colocate=False)
            t2 = time.perf_counter()
            engine_run(inputs, tmp / "colocated", args.shard_size, colocate=True)
            t3 = time.perf_counter()
        plain, eng, colo = n / (t1 - t0), n / (t2 - t1), n / (t3 - t2)
        print(f"{n:>7} {plain:>9.0f} {eng:>9.0f} {eng / plain:>6.2f} {colo:>12.0f} {colo / plain:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
