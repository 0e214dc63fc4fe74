"""trainer.evaluate: a benchmark edited with a (tiny) adapter and scored by the pipeline's scorers, one table
per task, in each benchmark layout it reads."""
from __future__ import annotations

import csv
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

pytest.importorskip("diffusers")


def _image(seed: int, size=(48, 40)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size[::-1], 3), np.uint8))


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    from diffusers import FluxTransformer2DModel

    from trainer.adapter_io import save_adapter
    from trainer.moe_lora import MoELoRAConfig
    from trainer.placement import install_moe_lora
    from trainer.tiny_flux import build_tiny_flux

    root = tmp_path_factory.mktemp("adapter")
    base = build_tiny_flux(root / "tiny")
    transformer = FluxTransformer2DModel.from_pretrained(base, subfolder="transformer")
    install_moe_lora(transformer, MoELoRAConfig(rank=4, alpha=4, num_experts=4))
    save_adapter(transformer, root / "adapter", base_model_id=str(base))
    return root / "adapter"


def test_a_reference_layout_benchmark_gives_one_row_per_task_and_the_mean_of_its_pairs(adapter, tmp_path):
    from trainer.evaluate import main

    bench = tmp_path / "bench"
    for i, (category, instruction) in enumerate([("subject_removal", "Remove the cat"),
                                                 ("subject_removal", "Remove the red cup"),
                                                 ("background", "Change the background to a beach")]):
        (bench / category).mkdir(parents=True, exist_ok=True)
        _image(i).save(bench / category / f"{instruction}_in.jpg")
    out = tmp_path / "eval"
    main(["--adapter", str(adapter), "--benchmark", str(bench), "--out", str(out), "--resolution", "32",
          "--steps", "1", "--max-sequence-length", "8", "--device", "cpu"])

    pairs = list(csv.DictReader((out / "pairs.csv").open()))
    assert sorted(p["instruction"] for p in pairs) == ["Change the background to a beach", "Remove the cat",
                                                       "Remove the red cup"]
    # a category that is not a task name takes its task from the instruction
    assert {p["category"]: p["task"] for p in pairs} == {"subject_removal": "subject_removal",
                                                        "background": "background_change"}
    table = {r["category"]: r for r in csv.DictReader((out / "by_task.csv").open())}
    assert list(table) == ["background", "subject_removal", "all"] and table["all"]["pairs"] == "3"
    removal = [float(p["change_global"]) for p in pairs if p["category"] == "subject_removal"]
    assert float(table["subject_removal"]["change_global"]) == pytest.approx(np.mean(removal))
    assert Image.open(out / "images" / "000000_out.png").size == (32, 32)
    assert "subject_removal" in (out / "by_task.md").read_text() and (out / "index.html").exists()


def test_parquet_benchmarks_are_read_with_their_column_names(tmp_path):
    from trainer.evaluate import read_benchmark

    def png(seed):
        buffer = io.BytesIO()
        _image(seed).save(buffer, "PNG")
        return buffer.getvalue()

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"image": pa.array([{"bytes": png(0), "path": None}, {"bytes": png(1), "path": None}],
                                               image),
                             "instruction": ["make it snow", "remove the dog"], "task": ["global", "remove"]}),
                   tmp_path / "test-00000.parquet")
    items = read_benchmark(str(tmp_path))
    assert [(i.instruction, i.category, i.image.shape) for i in items] == [("make it snow", "global", (40, 48, 3)),
                                                                           ("remove the dog", "remove", (40, 48, 3))]
    with pytest.raises(ValueError, match="no column 'edit_instruction'"):
        read_benchmark(str(tmp_path), columns=("image", "edit_instruction", "task"))


def test_our_shards_are_a_benchmark(default_run):
    from trainer.evaluate import read_benchmark

    report = json.loads((default_run / "report.json").read_text())
    items = read_benchmark(str(default_run / "shards" / "*.tar"))
    assert len(items) == report["accepted"] and all(i.instruction for i in items)
