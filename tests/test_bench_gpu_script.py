"""bench/flux_train_step_gpu.py: the GPU training-step benchmark runs end to end on the tiny FLUX on CPU, exits
cleanly without CUDA, survives an out-of-memory size, and its FLOP model reproduces the trainer anchors."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from bench import flux_train_step_gpu as bench  # noqa: E402
from trainer.moe_lora import MoELoRAConfig  # noqa: E402
from trainer.placement import install_moe_lora  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = {"micro_batch", "status", "s_per_step", "step_times_s", "samples_per_s", "peak_memory_gib", "loss",
            "useful_tflop_per_step", "hardware_tflop_per_step", "mfu_useful", "mfu_hardware"}


def test_tiny_cpu_run_writes_the_report(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "bench.flux_train_step_gpu", "--device", "cpu", "--tiny",
                           "--batch-sizes", "2", "1", "--warmup", "1", "--steps", "2", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "MFU useful" in done.stdout and "matmul peak" in done.stdout
    report = json.loads(out.read_text())
    assert {"card", "versions", "matmul_peak_tflops", "transformer_config", "adapter", "params", "tokens_per_sample",
            "flops_per_sample", "results", "wall_s"} <= report.keys()
    assert report["tokens_per_sample"] == {"text": 8, "image": 32}
    assert [r["micro_batch"] for r in report["results"]] == [1, 2]
    for row in report["results"]:
        assert row["status"] == "ok" and ROW_KEYS <= row.keys()
        assert len(row["step_times_s"]) == 2 and row["s_per_step"] > 0 and math.isfinite(row["loss"])
        assert row["peak_memory_gib"] is None  # CUDA only
        assert 0 < row["mfu_useful"] < row["mfu_hardware"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA this would run the real benchmark")
def test_without_cuda_it_exits_zero_and_says_why(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "bench.flux_train_step_gpu", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "no CUDA device" in done.stdout
    assert not out.exists()


def test_an_out_of_memory_size_is_reported_and_larger_ones_skipped(tmp_path, monkeypatch, capsys):
    real = bench.time_size

    def time_size(model, adapter, params, cfg, b, *rest):
        if b >= 2:
            torch.ones(1, requires_grad=True)  # something allocated, as in a real step
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(model, adapter, params, cfg, b, *rest)

    monkeypatch.setattr(bench, "time_size", time_size)
    out = tmp_path / "bench.json"
    assert bench.main(["--device", "cpu", "--tiny", "--batch-sizes", "1", "2", "4", "--warmup", "1", "--steps", "1",
                       "--out", str(out)]) == 0
    status = [r["status"] for r in json.loads(out.read_text())["results"]]
    assert status[:2] == ["ok", "oom"] and status[2].startswith("skipped")


def test_flop_model_reproduces_the_anchors():
    """anchors-trainer.md §5–6 at 512 px with the reference, built on the meta device (no memory, seconds)."""
    transformer = bench.build_transformer(bench.FLUX_DEV, "meta")
    adapter = install_moe_lora(transformer)
    assert sum(p.numel() for p in transformer.parameters() if not p.requires_grad) == 11_901_408_320
    assert sum(p.numel() for p in transformer.parameters() if p.requires_grad) == pytest.approx(985.3e6, rel=1e-3)
    f = bench.flops_per_sample(bench.FLUX_DEV, adapter, n_img=2048, n_txt=512)
    forward = f["blocks"] + f["embedders"] + f["proj_out"] + f["attention"]
    assert forward == pytest.approx(37.7e12, rel=0.01)  # base forward per sample
    assert f["adapter_dense"] == pytest.approx(4.64e12, rel=0.01)
    assert 12 * f["useful_step"] == pytest.approx(1.03e15, rel=0.01)  # mb 12, no recompute, top-2
    assert 12 * f["hardware_step"] == pytest.approx(1.66e15, rel=0.01)  # mb 12, recompute, dense-masked


def test_step_constants_are_the_training_defaults():
    from trainer.config import TrainConfig

    cfg = TrainConfig(base="x", data=[], out_dir="x")
    assert (bench.LR, bench.WEIGHT_DECAY, bench.MAX_GRAD_NORM, bench.GUIDANCE, bench.TIMESTEPS) == (
        cfg.lr, cfg.weight_decay, cfg.max_grad_norm, cfg.guidance, cfg.timesteps)
    assert (bench.LAMBDA, bench.TAU) == (cfg.contrastive.weight, cfg.contrastive.tau)
    benched, a = MoELoRAConfig(), cfg.adapter  # the full-size run installs MoELoRAConfig()
    assert (benched.rank, benched.alpha, benched.num_experts, benched.top_k) == (a.rank, a.alpha, a.experts, a.top_k)
