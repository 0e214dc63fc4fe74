"""Throughput of the three VLM backends on this CPU with one tiny random-weight Qwen2.5-VL (`tiny:qwen2.5-vl-vllm`,
the width vLLM's CPU attention accepts; workers/tiny_vlm.py): samples/s at batch 1 and 8, as a Markdown table.

    make vllm-env && python -m bench.vlm_backends [--requests 32]

- transformers: `TransformersVlm` in this process (xgrammar masks), `batch_size` requests per generate() call;
- openai → vLLM server: `OpenAiVlm` against vLLM's OpenAI-compatible server started from the vLLM environment on
  127.0.0.1 (tests/vllm_env.py); batch = requests in flight (`concurrency`), which the server batches itself;
- vllm: `VllmVlm`, its engine in a Ray actor (a local cluster) on the vLLM environment's Python; batch = requests
  per engine call.
Prompts: ask_yes_no with one 256² image (constrained to a 17-token reply) and VIEScore's SC judge with two (a
free reasoning string: random weights run it to the 64-token limit). Greedy; every backend gets the same
requests. Start-up (`start s`: build, load, engine or server start, first call) is apart from the timed calls.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tests.vllm_env import ENGINE, MISSING, SERVED_NAME, VLLM_PYTHON, vllm_server
from workers.tiny_models import build_tiny
from workers.vlm import OpenAiVlmConfig, TransformersVlmConfig, VllmVlmConfig, VlmAnswer, VlmRequest, build_vlm
from workers.vlm_prompts import render

BATCHES = (1, 8)
KEY_ENV = "X2EDIT_BENCH_VLLM_KEY"  # a local server takes any key; the backend always sends one


def requests(n: int) -> dict[str, list[VlmRequest]]:
    rng = np.random.default_rng(0)
    prompts = {"yes/no, 1 image": (render("ask_yes_no", "en", question="Is there a red car?"), 32),
               "VIEScore SC, 2 images": (render("viescore_sc", "en", instruction="make the car blue"), 64)}
    return {name: [VlmRequest([rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in prompt.images], prompt,
                              max_new_tokens=limit, seed=i) for i in range(n)]
            for name, (prompt, limit) in prompts.items()}


def measure(backend: str, make: Callable[[int], object], reqs: dict[str, list[VlmRequest]],
            start_s: float = 0.0) -> list[dict]:
    """`start_s`: what the backend needed before `make` (a server's start), added to its start-up."""
    rows = {name: {"backend": backend, "prompt": name} for name in reqs}
    startup = None
    for batch in BATCHES:
        start = time.perf_counter()
        vlm = make(batch)
        vlm.ask(next(iter(reqs.values()))[:1])  # the load or the engine's start
        startup = startup or round(start_s + time.perf_counter() - start, 1)
        for name, items in reqs.items():
            vlm.ask(items[:1])  # this prompt's warm-up: untimed
            tick = time.perf_counter()
            answers = vlm.ask(items)
            rows[name][f"batch {batch}"] = round(len(items) / (time.perf_counter() - tick), 1)
            rows[name]["answered"] = f"{sum(isinstance(a, VlmAnswer) for a in answers)}/{len(items)}"
        if hasattr(vlm, "close"):
            vlm.close()
        print(f"{backend} batch {batch} done", flush=True)
    return [{**row, "start s": startup} for row in rows.values()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=32, help="per prompt and batch size")
    args = parser.parse_args(argv)
    if not VLLM_PYTHON.exists():
        raise SystemExit(MISSING)
    import ray

    os.environ.setdefault("X2EDIT_TINY_MODELS", tempfile.mkdtemp(prefix="x2edit-tiny-"))
    os.environ[KEY_ENV] = "sk-unused"
    model = build_tiny("qwen2.5-vl-vllm")
    reqs = requests(args.requests)
    rows = measure("transformers (in process)", lambda b: build_vlm(TransformersVlmConfig(
        model=str(model), dtype="float32", batch_size=b)), reqs)
    start = time.perf_counter()
    with vllm_server(model, Path(tempfile.mkdtemp()) / "server.log") as url:
        rows += measure("openai → vLLM server", lambda b: build_vlm(OpenAiVlmConfig(
            base_url=url, api_key_env=KEY_ENV, model=SERVED_NAME, concurrency=b, max_retries=0)), reqs,
            start_s=time.perf_counter() - start)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows += measure("vllm (engine in a Ray actor)", lambda b: build_vlm(VllmVlmConfig(
        model=str(model), python=str(VLLM_PYTHON), num_gpus=0, batch_size=b, **ENGINE)), reqs)
    ray.shutdown()
    columns = ["backend", "prompt", *(f"batch {b}" for b in BATCHES), "answered", "start s"]
    print("\nsamples/s, tiny Qwen2.5-VL (hidden 128), 2 CPU cores\n")
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
