"""The shipped `tiny-models` recipe end to end through Ray: every model worker runs with tiny checkpoints loaded
through from_pretrained (sources drawn from prompts by a tiny FLUX, instructions by the VLM instructor on a tiny
Qwen2.5-VL taught its prompts, edits by a tiny FLUX.1-Kontext and the classical ops, the judge on a random-weight
Qwen2.5-VL) and the text editor with its real PP-OCR models, and the corpus, ledger and provenance are those of a
real run."""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.run import run
from manifests.inspect import open_run, read_members
from manifests.shards import decode_record
from tests.corpus import check_run
from workers.sample_images import list_samples
from workers.tiny_vlm_trained import INSTRUCTIONS
from workers.vlm_instructor import language_of

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

    from manifests.show import show_pair

    record = show_pair(open_run(run_dir), per_backend["kontext"][0], tmp_path / "pair")
    edit = record["provenance"]["edit"]
    assert (edit["worker"], edit["model"], edit["pipeline"]) == ("diffusers", "tiny:flux-kontext", "FluxKontextPipeline")
    assert (edit["dtype"], edit["steps"], edit["guidance"], edit["seed"]) == ("float32", 2, 2.5, record["seed"])
    assert edit["load_seconds"] > 0 and record["mask"] == "whole_image"

    check_vlm_instructions(run_dir, ledger, per_backend["kontext"])

    times = defaultdict(list)  # per-editor CPU time with the tiny models (seconds per pair, load included)
    for r in ledger:
        if r["editor"] and r["t_edit"]:
            times[r["editor"].split(":")[0]].append(r["t_edit"])
    print(json.dumps({k: round(sum(v) / len(v), 4) for k, v in times.items()}))


def check_vlm_instructions(run_dir: Path, ledger: list[dict], kontext_pairs: list[str]) -> None:
    """Kontext follows instructions, so its candidates were instructed by the VLM: each accepted pair's instruction
    is what the tiny instructor proposed and kept, in the right languages by lingua, with the templates and the
    model in its provenance. Prints the share of those candidates per outcome of the instruct stage, and the share
    of accepted pairs the judge (random weights) left unscored, per VLM reason."""
    run = open_run(run_dir)
    by_shard = defaultdict(set)
    for row in ledger:
        if row["pair_id"] in kontext_pairs:
            by_shard[row["shard"]].add(row["pair_id"])
    for shard, keys in by_shard.items():
        for key, members in read_members(run, shard, keys).items():
            record = decode_record(json.loads(members[f"{key}.json"]))
            trace = record["params"]["instruct"]
            said = {"en": record["instruction_en"], "zh": record["instruction_zh"]}
            assert record["op"] == f"{record['task']}.vlm" and trace["verdict"] == "passed"
            assert trace["proposed"] == said == INSTRUCTIONS[record["task"]]  # memorised, whatever the image
            assert {lang: language_of(text) for lang, text in said.items()} == {"en": "en", "zh": "zh"}
            assert trace["vlm"]["model"] == "tiny:qwen2.5-vl-instructor" and trace["vlm"]["constrained"]
            assert trace["propose"]["template"] == "propose/en@vlm-propose-1" and len(trace["propose"]["sha256"]) == 64
            assert trace["reflect"]["template"] == "reflect/en@vlm-reflect-1"
            assert trace["attempts"][-1]["reply"]["verdict"] == "keep"

    asked = [r for r in ledger if r["editor"] and r["editor"].startswith("kontext")]
    ended = Counter(r["reason"] if r["stage"] == "instruct" else "passed" for r in asked)
    shares = {reason: round(n / len(asked), 3) for reason, n in ended.most_common()}
    accepted = [r for r in ledger if r["status"] == "accepted"]
    unjudged = Counter(w.split(":")[0] for r in accepted for w in r["warnings"] or [] if ": judge:" in w)
    print(json.dumps({"vlm_instructed": len(asked), "instruct_share_per_outcome": shares,
                      "judge_unscored_share": {code: round(n / len(accepted), 3) for code, n in unjudged.items()}}))
    assert ended["passed"] / len(asked) > 0.9  # the fixture writes finished, schema-valid replies
