"""The shipped default recipe's corpus, read by stock readers with their default arguments: every pair carries
the same members and its json the same fields and types, or `datasets` / Ray Data refuse the shards."""
from __future__ import annotations

import json


def test_hf_datasets_and_ray_data_read_the_default_corpus_with_defaults(default_run, tmp_path):
    import ray.data
    from datasets import load_dataset

    tars = sorted(str(p) for p in (default_run / "shards").glob("x2edit-*.tar"))
    report = json.loads((default_run / "report.json").read_text())
    assert len(tars) > 1 and report["accepted"] > 100

    hf = load_dataset("webdataset", data_files={"train": tars}, split="train", cache_dir=str(tmp_path / "hf"))
    assert hf.num_rows == report["accepted"]
    assert {r["mask"] for r in hf["json"]} == {"region", "whole_image"}  # both kinds of edit are in the corpus
    assert all(image.size == mask.size for image, mask in zip(hf["src.jpg"], hf["mask.png"]))

    rows = ray.data.read_webdataset(tars).take_all()
    assert sorted(r["__key__"] for r in rows) == sorted(hf["__key__"])
    assert len({r["json"]["op"] for r in rows}) >= 15  # the ops' different parameters share one record schema
    assert all(json.loads(r["json"]["scores"]) for r in rows)
