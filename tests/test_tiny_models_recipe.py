"""The shipped `tiny-models` recipe end to end through Ray: every model worker runs with tiny random-weight
checkpoints loaded through from_pretrained (sources drawn from prompts by a tiny FLUX, edits by a tiny
FLUX.1-Kontext and the classical ops) and the text editor with its real PP-OCR models, and the corpus, ledger
and provenance are those of a real run."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.run import run
from tests.corpus import check_run
from workers.sample_images import list_samples

ROOT = Path(__file__).resolve().parents[1]


def test_the_tiny_models_recipe_runs_every_model_worker(ray_cluster, tmp_path):
    run_dir = tmp_path / "run"
    report = run("tiny-models", str(run_dir), address=ray_cluster["address"])
    counts = check_run(run_dir, "tiny")
    assert counts["accepted"] == report["accepted"] > 20
    ledger = pq.read_table(run_dir / "ledger.parquet").to_pylist()
    prompts = [line for line in (ROOT / "prompts" / "synthetic_prompts.txt").read_text().splitlines() if line.strip()]
    assert len({r["sample_id"] for r in ledger}) == len(list_samples(8, 8)) + len(prompts)
    synthetic = [r for r in ledger if "synthetic_prompts.txt#L" in r["source_uri"]]
    assert {r["reason"] for r in synthetic if r["stage"] == "source"} == {"invalid_prompt"}  # screened out
    assert any(r["status"] == "accepted" and r["task"] == "subject_driven" for r in synthetic)  # drawn, then edited

    per_backend: dict[str, list[float]] = defaultdict(list)
    for shard in sorted((run_dir / "shards").glob("tiny-*.parquet")):
        for row in pq.read_table(shard).to_pylist():
            per_backend[row["editor"].split(":")[0]].append(row["pair_id"])
    assert set(per_backend) == {"classical", "kontext", "text", "expert"}
    manifest = pq.read_table(sorted((run_dir / "shards").glob("tiny-*.parquet"))[0]).column_names
    learned = {"aesthetic_src", "dino", "clip_i", "clip_t", "clipiqa_edited", "liqe_src", "liqe_delta"}
    assert {f"score_{name}" for name in learned} <= set(manifest)  # every learned scorer ran through Ray

    from manifests.inspect import open_run
    from manifests.show import show_pair

    record = show_pair(open_run(run_dir), per_backend["kontext"][0], tmp_path / "pair")
    edit = record["provenance"]["edit"]
    assert (edit["worker"], edit["model"], edit["pipeline"]) == ("diffusers", "tiny:flux-kontext", "FluxKontextPipeline")
    assert (edit["dtype"], edit["steps"], edit["guidance"], edit["seed"]) == ("float32", 2, 2.5, record["seed"])
    assert edit["load_seconds"] > 0 and record["mask"] == "whole_image"

    times = defaultdict(list)  # per-editor CPU time with the tiny models (seconds per pair, load included)
    for r in ledger:
        if r["editor"] and r["t_edit"]:
            times[r["editor"].split(":")[0]].append(r["t_edit"])
    print(json.dumps({k: round(sum(v) / len(v), 4) for k, v in times.items()}))
