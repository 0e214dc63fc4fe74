"""The edit stage's own cost around the model call: for each editor of the `tiny-models` recipe, the same
pairs through `EditStage.process` (decode the source, build requests, dispatch, resize, encode JPEG/PNG,
provenance) against the editor's `edit` call alone on the already decoded images, side by side in one run.
Reported as seconds per pair and the overhead as a fraction of the call.

    python -m bench.edit_overhead               # 32 pairs per editor of the tiny-models recipe
    python -m bench.edit_overhead --pairs 64
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

from manifests.images import encode_jpeg
from manifests.schema import LIVE, empty_row
from pipeline.recipe import load_recipe
from stages.base import StageContext, decode_own
from stages.edit import EditStage, editor_name, subject_from
from stages.instruct import InstructStage
from workers.base import EditRequest
from workers.sample_images import generate_scene


def pairs_by_editor(recipe, ctx: StageContext, n: int) -> dict[str, list[dict]]:
    """At least n instructed pairs per editor, from generated scenes (resized as the source stage would)."""
    from stages.source import resize_short_side

    instruct = InstructStage((recipe.instruct, recipe.edit), ctx)
    out: dict[str, list[dict]] = defaultdict(list)
    position = 0
    while min((len(out[name]) for name in recipe.edit.editors), default=0) < n and position < 50 * n:
        image = resize_short_side(generate_scene(position % 64)[0], recipe.source.work_short_side)
        row = empty_row()
        row.update(unit_id=f"s{position}", sample_id=f"s{position}", fanout=1, status=LIVE, position=position,
                   src=encode_jpeg(image))
        for row in instruct.process_row(row):
            if row["status"] == LIVE:
                out[editor_name(row)].append(row)
        position += 1
    return {name: rows[:n] for name, rows in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="tiny-models")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    ctx = StageContext(seed=recipe.seed, recipe_hash=recipe.hash(), run_dir=".")
    stage = EditStage(recipe.edit, ctx)
    results = {}
    for name, rows in sorted(pairs_by_editor(recipe, ctx, args.pairs).items()):
        if not rows:
            print(f"{name:>10}: no pair on the generated scenes (its gates turned every one down)", flush=True)
            continue
        editor = stage.editors[name]
        images = [decode_own(r["src"]) for r in rows]
        requests = [EditRequest(op=r["op"], params=json.loads(r["params"]), instruction_en=r["instruction_en"],
                                instruction_zh=r["instruction_zh"], seed=r["seed"], subject=subject_from(r))
                    for r in rows]
        stage.process(rows)  # loads the model and warms its kernels at these sizes: in neither figure
        call = whole = float("inf")
        for _ in range(args.repeats):  # interleaved, best of each: the machine's noise hits both alike
            start = time.perf_counter()
            editor.edit(images, requests)
            call = min(call, time.perf_counter() - start)
            start = time.perf_counter()
            stage.process(rows)
            whole = min(whole, time.perf_counter() - start)
        results[name] = {"pairs": len(rows), "call_s_per_pair": round(call / len(rows), 4),
                         "stage_s_per_pair": round(whole / len(rows), 4),
                         "overhead_of_call": round((whole - call) / call, 3)}
        print(f"{name:>10}: {len(rows)} pairs, call {call / len(rows) * 1e3:.1f} ms/pair, stage "
              f"{whole / len(rows) * 1e3:.1f} ms/pair, overhead {(whole - call) / call:.1%} of the call", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
