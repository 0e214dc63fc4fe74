"""Evaluate a trained adapter the way the paper does: edit a benchmark's images, score the edits with the
pipeline's scorers, one table per task.

    python -m trainer.evaluate --adapter runs/train-tiny/adapter --benchmark bench_dir/ --out runs/eval \
        [--recipe x2edit-gpu] [--limit 50] [--resolution 512 --steps 28 --guidance 3.5]

Benchmarks (`--benchmark`, detected from what the path holds):
- our corpus, or the X2Edit release's shards: `.tar` files (a file, a folder of them or a glob); the source
  image, instruction (English, else Chinese) and task of each pair, read as the trainer reads them;
- the reference evaluation layout (reference-code.md §5): a folder of `<instruction>_in.jpg` files, the
  instruction being the file name minus the suffix (`--in-suffix`); subfolders are task categories;
- a Parquet file or folder in the Hugging Face `datasets` layout (an image column holding {bytes, path}):
  `--image-column image --instruction-column instruction --category-column task` by default, which is the Emu
  Edit test set's layout.
A category that is not one of our task names gets its task id from the instruction (trainer/classify.py).

Scoring is the score stage itself (stages/score.py) with an empty policy: the heuristic scores always, and the
model scorers of `--recipe`'s `score.scorers` (aesthetic, similarity, pyiqa, ImgEdit-Judge, VIEScore, …), so a
benchmark is scored exactly like the corpus. Writes `pairs.csv` (every score of every edit), `by_task.csv` and
`by_task.md` (mean of each score per category, and over all), `index.html` (source | edit side by side) and
the images under `images/`.
"""
from __future__ import annotations

import argparse
import csv
import glob
import html
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm import tqdm

from manifests.images import decode_image, encode_png
from manifests.schema import empty_row
from manifests.shards import iter_shard
from manifests.taxonomy import TASKS, task_by_name
from pipeline.recipe import load_recipe
from stages.base import StageContext
from stages.score import ScoreConfig, ScoreStage
from trainer.adapter_io import read_adapter_config
from trainer.classify import resolve_task
from trainer.data import fit, pair_record, to_uint8
from trainer.edit import edit, load_editor

MAX_PIXELS = 1 << 26  # a benchmark image larger than 64 MP is refused like any hostile input


@dataclass(frozen=True)
class BenchItem:
    key: str
    image: np.ndarray  # RGB uint8
    instruction: str
    category: str  # the benchmark's own grouping, the table's rows


def read_benchmark(spec: str, in_suffix: str = "_in.jpg", columns: tuple[str, str, str] = ("image", "instruction",
                                                                                             "task")) -> list[BenchItem]:
    paths = sorted(glob.glob(spec)) if any(c in spec for c in "*?[") else [spec]
    if not paths or not all(Path(p).exists() for p in paths):
        raise FileNotFoundError(f"--benchmark {spec}: no such file or folder")
    files = [f for p in map(Path, paths) for f in (sorted(p.rglob("*")) if p.is_dir() else [p]) if f.is_file()]
    if tars := [f for f in files if f.suffix == ".tar"]:
        return [item for tar in tars for item in _from_shard(tar)]
    if parquets := [f for f in files if f.suffix == ".parquet"]:
        return [item for path in parquets for item in _from_parquet(path, *columns)]
    items = [_from_file(f, Path(paths[0]), in_suffix) for f in files if f.name.endswith(in_suffix)]
    if not items:
        raise ValueError(f"--benchmark {spec}: no .tar shards, .parquet files or *{in_suffix} images in it")
    return items


def _decode(data: bytes) -> np.ndarray:
    return decode_image(data, max_pixels=MAX_PIXELS)


def _from_shard(path: Path) -> list[BenchItem]:
    items = []
    for sample in iter_shard(path):
        task_id, english, chinese = pair_record(json.loads(sample["json"]))  # the trainer's reading of a json
        items.append(BenchItem(sample["__key__"], _decode(sample["src.jpg"]), english or chinese,
                               TASKS[task_id].name))
    return items


def _from_parquet(path: Path, image: str, instruction: str, category: str) -> list[BenchItem]:
    table = pq.read_table(path)
    missing = [c for c in (image, instruction, category) if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: no column {missing[0]!r} (columns: {', '.join(table.column_names)}); "
                         "name them with --image-column / --instruction-column / --category-column")
    rows = table.select([image, instruction, category]).to_pylist()
    return [BenchItem(f"{path.stem}-{i:06d}", _decode(r[image]["bytes"] if isinstance(r[image], dict) else r[image]),
                      r[instruction], str(r[category])) for i, r in enumerate(rows)]


def _from_file(path: Path, root: Path, in_suffix: str) -> BenchItem:
    """§5: the instruction is the file name minus the suffix; the folder below the root is the category."""
    instruction = path.name[:-len(in_suffix)]
    category = path.parent.relative_to(root).as_posix() if path.parent != root else "all"
    return BenchItem(f"{category}/{instruction}", _decode(path.read_bytes()), instruction, category)


def task_of(item: BenchItem) -> str:
    """Our task name for the adapter's gates: the category when it is one, else the instruction's."""
    names = {t.name for t in TASKS}
    return item.category if item.category in names else TASKS[resolve_task(None, item.instruction)].name


def score_edits(items: list[BenchItem], edits: list[np.ndarray], scorers: dict, tasks: list[str]) -> list[dict]:
    """Every score of every edit, through the score stage with no rules (nothing is rejected)."""
    stage = ScoreStage(ScoreConfig(scorers=scorers), StageContext(seed=0, recipe_hash="evaluate", run_dir="."))
    rows = []
    for i, (item, edit, task) in enumerate(zip(items, edits, tasks)):
        source = to_uint8(fit(Image.fromarray(item.image), edit.shape[:2]))  # the bucket the adapter edited in
        rows.append({**empty_row(), "unit_id": str(i), "src": encode_png(source), "edited": encode_png(edit),
                     "task": task, "instruction_en": item.instruction, "warnings": []})
    scored = {int(r["unit_id"]): r for r in stage.process(rows)}
    return [{"key": item.key, "category": item.category, "task": tasks[i], "instruction": item.instruction,
             "status": scored[i]["status"], "reason": scored[i]["reason"] or "",
             **json.loads(scored[i]["scores"] or "{}")} for i, item in enumerate(items)]


def by_category(results: list[dict]) -> list[dict]:
    """Mean of each score per category and over all (the reference's column means, §5)."""
    names = sorted({k for r in results for k, v in r.items() if isinstance(v, float)})
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        groups[r["category"]].append(r)
    table = []
    for category, rows in [*sorted(groups.items()), ("all", results)]:
        means = {n: float(np.mean(vals)) if (vals := [r[n] for r in rows if n in r]) else None for n in names}
        table.append({"category": category, "pairs": len(rows), **means})
    return table


def write_outputs(out: Path, items: list[BenchItem], edits: list[np.ndarray], results: list[dict]) -> None:
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i, (item, edit) in enumerate(zip(items, edits)):
        Image.fromarray(item.image).save(images / f"{i:06d}_in.jpg", quality=90)
        Image.fromarray(edit).save(images / f"{i:06d}_out.png")
    _write_csv(out / "pairs.csv", results)
    table = by_category(results)
    _write_csv(out / "by_task.csv", table)
    (out / "by_task.md").write_text(_markdown(table))
    (out / "index.html").write_text(_html(results, table))


def _write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else "–" if value is None else str(value)


def _markdown(table: list[dict]) -> str:
    fields = list(table[0])
    lines = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    lines += ["| " + " | ".join(_fmt(row[f]) for f in fields) + " |" for row in table]
    return "\n".join(lines) + "\n"


def _html(results: list[dict], table: list[dict]) -> str:
    fields = list(table[0])
    head = "".join(f"<th>{html.escape(f)}</th>" for f in fields)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(row[f]))}</td>" for f in fields) + "</tr>" for row in table)
    cards = "".join(
        f"<figure><img src='images/{i:06d}_in.jpg'><img src='images/{i:06d}_out.png'><figcaption>"
        f"<b>{html.escape(r['category'])}</b> {html.escape(r['instruction'])}<br><small>"
        f"{html.escape(', '.join(f'{k}={_fmt(v)}' for k, v in r.items() if isinstance(v, float)))}</small>"
        f"</figcaption></figure>" for i, r in enumerate(results))
    style = ("body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
             "padding:2px 6px}figure{display:inline-block;width:420px;vertical-align:top;margin:6px}"
             "figure img{width:200px;margin-right:4px}")
    return (f"<!doctype html><meta charset=utf-8><title>evaluation</title><style>{style}</style>"
            f"<h1>Per task</h1><table><tr>{head}</tr>{body}</table><h1>Edits</h1>{cards}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--base", help="FLUX.1 pipeline path or id (default: the adapter's base model)")
    parser.add_argument("--benchmark", required=True, help="shards, a §5 folder or a Parquet benchmark")
    parser.add_argument("--out", required=True)
    parser.add_argument("--recipe", help="recipe whose score.scorers score the edits (default: heuristics only)")
    parser.add_argument("--limit", type=int, help="the first N items only")
    parser.add_argument("--in-suffix", default="_in.jpg")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--instruction-column", default="instruction")
    parser.add_argument("--category-column", default="task")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-sequence-length", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    scorers = load_recipe(args.recipe).score.scorers if args.recipe else {}  # checked before any model loads
    items = read_benchmark(args.benchmark, args.in_suffix,
                           (args.image_column, args.instruction_column, args.category_column))[:args.limit]
    base = args.base or read_adapter_config(args.adapter)["base_model_id"]
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    pipe, adapter = load_editor(base, args.adapter, dtype=dtype, device=args.device)
    tasks = [task_of(item) for item in items]
    edits = [np.asarray(edit(pipe, adapter, Image.fromarray(item.image), item.instruction, task_by_name(task).id,
                             resolution=args.resolution, steps=args.steps, guidance=args.guidance, seed=args.seed,
                             max_sequence_length=args.max_sequence_length))
             for item, task in tqdm(list(zip(items, tasks)), desc="evaluate: edits", unit="image")]
    results = score_edits(items, edits, scorers, tasks)
    out = Path(args.out)
    write_outputs(out, items, edits, results)
    print(_markdown(by_category(results)))
    print(f"wrote {out / 'by_task.csv'}, {out / 'pairs.csv'} and {out / 'index.html'}")


if __name__ == "__main__":
    main()
