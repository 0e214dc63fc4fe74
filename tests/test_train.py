"""The trainer end to end on the tiny FLUX: exact resume, adapter export, two processes (DDP, FSDP2) with accelerate."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from trainer.config import TrainConfig  # noqa: E402
from trainer.tiny_flux import build_tiny_flux, write_random_corpus  # noqa: E402
from trainer.train import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    write_random_corpus(root / "corpus-000000.tar")
    return {"root": root, "base": str(build_tiny_flux(root / "tiny-flux")), "data": [str(root / "*.tar")]}


def _cfg(setup, out: str, steps: int, **overrides) -> TrainConfig:
    return TrainConfig(**{"base": setup["base"], "data": setup["data"], "out_dir": str(setup["root"] / out),
                          "resolution": 32, "steps": steps, "max_sequence_length": 16, "checkpoint_every": 2,
                          "warmup_steps": 2, "adapter": {"rank": 8, "alpha": 8, "experts": 4, "top_k": 2},
                          **overrides})


def _log(setup, out: str, name: str = "train_log.jsonl") -> list[dict]:
    return [json.loads(line) for line in (setup["root"] / out / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(setup) -> list[dict]:
    """An uninterrupted 4-step run in `straight/` (its log; its adapter is on disk)."""
    return train(_cfg(setup, "straight", 4))


def test_a_resumed_run_continues_exactly(setup, straight):
    first = train(_cfg(setup, "resumed", 2))
    (setup["root"] / "resumed" / "checkpoint-notes").mkdir()  # a user's folder: neither resumed from nor pruned
    second = train(_cfg(setup, "resumed", 4))  # finds checkpoint-2 and goes on from there
    assert [r["step"] for r in second] == [3, 4]
    assert first == straight[:2] and second == straight[2:]  # bitwise-equal losses on CPU
    assert all(r["task"] > 0 and r["flow"] > 0 for r in straight)
    # The first step of each epoch reports it: the corpus's 3 tasks × 4 pairs, each pair drawn at least once.
    epochs = [r["epoch"] for r in straight if "epoch" in r]
    assert epochs[0]["epoch"] == 0 and "epoch" in straight[0] and epochs[0]["batches"] >= 3
    assert {name: use["pairs"] for name, use in epochs[0]["tasks"].items()} == {
        "style_change": 4, "tone_transformation": 4, "camera_movement": 4}
    assert all(use["drawn"] >= 4 for use in epochs[0]["tasks"].values())
    assert not list((setup["root"] / "resumed").glob(".checkpoint-*"))  # no half-written checkpoint left
    assert (setup["root"] / "resumed" / "checkpoint-notes").is_dir()


def test_a_checkpoint_of_another_adapter_is_refused_by_name(setup):
    train(_cfg(setup, "other-adapter", 2))
    with pytest.raises(ValueError, match=r"checkpoint-2 does not fit this run .*experts_down"):
        train(_cfg(setup, "other-adapter", 4, adapter={"rank": 8, "alpha": 8, "experts": 3, "top_k": 2}))


def test_a_run_starts_from_an_exported_adapter(setup):
    """The paper's 1024-px stage starts from the 512-px stage's adapter: with lr 0 it comes out unchanged."""
    from safetensors.torch import load_file

    train(_cfg(setup, "stage-1", 2))
    stage_1 = setup["root"] / "stage-1" / "adapter"
    history = train(_cfg(setup, "stage-2", 1, init_adapter=str(stage_1), lr=0.0))
    assert [r["step"] for r in history] == [1]
    before, after = load_file(stage_1 / "adapter.safetensors"), load_file(setup["root"] / "stage-2" / "adapter" /
                                                                          "adapter.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match=r"stage-1/adapter: the adapter is .*num_experts=4.* wants .*num_experts=3"):
        train(_cfg(setup, "stage-2-other", 1, init_adapter=str(stage_1),
                   adapter={"rank": 8, "alpha": 8, "experts": 3, "top_k": 2}))


def test_the_exported_adapter_loads_into_a_fresh_transformer(setup, straight):
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    from trainer.adapter_io import load_adapter

    out = setup["root"] / "straight" / "adapter"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_id"] == setup["base"] and config["rank"] == 8
    saved = load_file(out / "adapter.safetensors")
    assert any(k.endswith("up") and v.abs().sum() > 0 for k, v in saved.items())  # the experts trained
    transformer = FluxTransformer2DModel.from_pretrained(setup["base"], subfolder="transformer")
    adapter = load_adapter(transformer, out)
    loaded = dict(adapter.named_adapter_parameters())
    assert set(loaded) == set(saved) and all(torch.equal(loaded[k].detach(), saved[k]) for k in saved)


def _launch(setup, tmp_path, out: str, steps: int, **overrides) -> list[dict]:
    """`accelerate launch` with two CPU processes (gloo); returns the run's log."""
    recipe = tmp_path / f"{out}.yaml"
    recipe.write_text(json.dumps(_cfg(setup, out, steps, **overrides).model_dump()))  # JSON is YAML
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
         "-m", "trainer.train", "--recipe", str(recipe)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return _log(setup, out)


VALIDATION = {"pairs_per_task": 1, "every": 2}  # 3 held-out pairs: over 2 processes, the last round is padded


@pytest.fixture(scope="module")
def ddp_log(setup, tmp_path_factory):
    return _launch(setup, tmp_path_factory.mktemp("ddp"), "ddp", 4, validation=VALIDATION)


def test_validation_is_deterministic_and_leaves_training_as_it_was(setup):
    runs = {every: train(_cfg(setup, f"val-{every}", 4, validation={"pairs_per_task": 1, "every": every}))
            for every in (1, 2)}
    assert runs[1] == runs[2]  # validating after every step changes nothing in training
    logs = {every: _log(setup, f"val-{every}", "val_log.jsonl") for every in (1, 2)}
    assert [r["step"] for r in logs[1]] == [1, 2, 3, 4] and [r["step"] for r in logs[2]] == [2, 4]
    assert logs[2] == [logs[1][1], logs[1][3]]  # same pairs, VAE samples and noise: same values
    assert set(logs[2][0]["val"]) == {"style_change", "tone_transformation", "camera_movement"}
    assert logs[2][0]["val"] != logs[2][1]["val"] and all(v > 0 for v in logs[2][1]["val"].values())


@pytest.mark.slow  # several processes
def test_two_processes_train_with_accelerate_launch(setup, ddp_log):
    checkpoint = setup["root"] / "ddp" / "checkpoint-4"
    assert (checkpoint / "rng-0.pt").exists() and (checkpoint / "rng-1.pt").exists()
    assert [r["step"] for r in ddp_log] == [1, 2, 3, 4]  # written once, by the main process
    # The schedule counts optimizer steps, however many processes share each one's batch.
    assert [r["lr"] for r in ddp_log] == pytest.approx([1e-4 * min(1, (s + 1) / 3) for s in (1, 2, 3, 4)])


@pytest.mark.slow  # several processes
def test_fsdp_trains_like_ddp_and_resumes_exactly(setup, ddp_log, tmp_path):
    """FSDP2 on two processes (with gradient checkpointing): the same losses as DDP up to the order of the
    gradient reductions, each process writes its own half of the checkpoint, the exported adapter is the
    whole one, and a run resumed from the step-2 checkpoint repeats steps 3-4 bit for bit."""
    import shutil

    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    fsdp = _launch(setup, tmp_path, "fsdp", 4, fsdp=True, gradient_checkpointing=True, validation=VALIDATION)
    assert [r["step"] for r in fsdp] == [1, 2, 3, 4]
    for a, b in zip(fsdp, ddp_log):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["task"] == pytest.approx(b["task"], rel=1e-5)
    validations = [_log(setup, run, "val_log.jsonl") for run in ("fsdp", "ddp")]
    assert [r["step"] for r in validations[0]] == [2, 4]  # written once, by the main process
    for a, b in zip(*validations):
        assert a["val"] == pytest.approx(b["val"], rel=1e-5) and len(a["val"]) == 3
    shards = sorted((setup["root"] / "fsdp" / "checkpoint-2").glob("*.distcp"))
    sizes = [p.stat().st_size for p in shards]
    assert len(shards) == 2 and min(sizes) > 0.4 * sum(sizes)  # sharded: half each, not one full copy

    adapters = [load_file(setup["root"] / run / "adapter" / "adapter.safetensors") for run in ("fsdp", "ddp")]
    assert adapters[0].keys() == adapters[1].keys()
    for key, value in adapters[0].items():
        torch.testing.assert_close(value, adapters[1][key], rtol=1e-4, atol=1e-6, msg=key)

    resumed = setup["root"] / "fsdp-resumed"
    resumed.mkdir()
    shutil.copytree(setup["root"] / "fsdp" / "checkpoint-2", resumed / "checkpoint-2")
    again = _launch(setup, tmp_path, "fsdp-resumed", 4, fsdp=True, gradient_checkpointing=True,
                    validation=VALIDATION)
    assert again == fsdp[2:]

    # On one process instead of two: the checkpoint's halves are put back together into the whole adapter.
    one = setup["root"] / "fsdp-on-one"
    one.mkdir()
    shutil.copytree(setup["root"] / "fsdp" / "checkpoint-2", one / "checkpoint-2")
    assert train(_cfg(setup, "fsdp-on-one", 2, validation=VALIDATION)) == []  # nothing left: resumes, exports
    exported = load_file(one / "adapter" / "adapter.safetensors")
    stored = {"model": {("moe_lora." if k.startswith("task_embedding") else "") + k: torch.empty_like(v)
                        for k, v in exported.items()}}
    dcp.load(stored, checkpoint_id=str(one / "checkpoint-2"), no_dist=True)
    assert all(torch.equal(stored["model"][k], v) for k, v in zip(stored["model"], exported.values()))
    assert not torch.equal(exported["task_embedding.weight"], adapters[0]["task_embedding.weight"])  # step 2 ≠ 4


@pytest.mark.slow  # several processes
def test_sigkill_mid_run_then_restart_continues_exactly(setup, tmp_path):
    """Killed at an arbitrary step (whatever it was doing), restarted with the same command: every step after
    the last checkpoint is recomputed and equals the uninterrupted run's."""
    import signal
    import time

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(_cfg(setup, "killed", 12).model_dump()))
    command = [sys.executable, "-m", "trainer.train", "--recipe", str(recipe)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = setup["root"] / "killed"
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoint-2").exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "adapter").exists(), "the run ended before the kill"
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    straight = {r["step"]: r for r in train(_cfg(setup, "unkilled", 12))}
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert {r["step"] for r in log} == set(range(1, 13))
    assert all(r == straight[r["step"]] for r in log)  # recomputed steps, too, equal the uninterrupted run


def test_the_trained_adapter_is_evaluated_on_its_corpus(setup, straight):
    """trainer.evaluate on the adapter this module trained, with its own shards as the benchmark."""
    import csv

    from trainer.evaluate import main as evaluate

    out = setup["root"] / "eval"
    evaluate(["--adapter", str(setup["root"] / "straight" / "adapter"), "--benchmark", setup["data"][0],
              "--out", str(out), "--limit", "6", "--resolution", "32", "--steps", "2",
              "--max-sequence-length", "16", "--device", "cpu"])
    table = {r["category"]: r for r in csv.DictReader((out / "by_task.csv").open())}
    pairs = list(csv.DictReader((out / "pairs.csv").open()))
    assert len(pairs) == 6 and int(table.pop("all")["pairs"]) == 6
    assert set(table) == {p["category"] for p in pairs} and all(float(p["change_global"]) >= 0 for p in pairs)
