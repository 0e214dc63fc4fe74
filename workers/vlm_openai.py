"""The VLM worker on any OpenAI-compatible chat endpoint (vllm serve, SGLang, hosted APIs):
`POST {base_url}/chat/completions`, one user turn of the images as base64 PNG data URLs then the text, and the
prompt's JSON schema as `response_format` (strict), so a server with structured output decodes to it. The reply
goes through the same parser as every backend's (workers/vlm.py), since a server may ignore the schema.

The connection (key from a named environment variable, timeouts, retries with jittered backoff honouring
Retry-After, rate limit, bounded bodies) is workers/http_api.py's; requests run `concurrency` at a time.

What a request ends as:
- a `VlmAnswer`, or the parser's `Rejected` (`vlm_unparseable`, `vlm_schema_mismatch`, `vlm_truncated` when
  finish_reason is "length");
- `Rejected("vlm_bad_request")` when the server refuses this request (400/413/415/422: an image too large, a
  prompt over the context, a policy refusal), `vlm_refused` when the model declines (a `refusal` message or
  finish_reason "content_filter"), `api_malformed_response` when the body is not a chat completion;
- an exception, which fails the batch: `ApiUnavailable` after the last retry, `ApiError` on any other status
  (401 bad key, 404 wrong model or URL: no request could succeed), `MissingApiKey`.
"""
from __future__ import annotations

import base64
import json
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

from manifests.images import encode_png
from manifests.rejected import Rejected
from workers.http_api import ApiError, HttpApi
from workers.vlm import OpenAiVlmConfig, VlmAnswer, VlmRequest, excerpt, to_answer

VERSION = "1"

_REFUSED = frozenset({400, 413, 415, 422})  # the request itself is refused: this request's images or text


class OpenAiVlm:
    backend: ClassVar[str] = "openai"

    def __init__(self, cfg: OpenAiVlmConfig) -> None:
        self.cfg = cfg
        self.http = HttpApi(cfg)

    def provenance(self) -> dict:
        return {"worker": "vlm", "backend": self.backend, "version": VERSION, "host": self.http.host,
                "model": self.cfg.model, "temperature": self.cfg.temperature}

    def ask(self, requests: Sequence[VlmRequest]) -> list[VlmAnswer | Rejected]:
        self.http.api_key()  # a missing key fails the batch before any request, naming the variable
        with ThreadPoolExecutor(self.cfg.concurrency, thread_name_prefix="vlm-chat") as pool:
            futures = [pool.submit(self._ask_one, request) for request in requests]
        # Leaving the pool waited for every request; the first error, if any, fails the batch.
        return [future.result() for future in futures]

    def _ask_one(self, request: VlmRequest) -> VlmAnswer | Rejected:
        start = time.perf_counter()
        status, body = self.http.call(f"POST {self.http.host}/chat/completions", "POST", "/chat/completions",
                                      json=self._payload(request))
        seconds = time.perf_counter() - start
        if status in _REFUSED:
            return Rejected("vlm_bad_request", f"HTTP {status}: {self.http.error_text(body)}")
        if not 200 <= status < 300:
            raise ApiError(f"HTTP {status} from {self.http.host}/chat/completions: {self.http.error_text(body)}")
        try:
            choice, tokens = _first_choice(body)
        except Rejected as rejected:
            return rejected
        message, finish = choice["message"], choice.get("finish_reason")
        if isinstance(message.get("refusal"), str) or finish == "content_filter":
            return Rejected("vlm_refused", excerpt(message.get("refusal") or f"finish_reason {finish}"))
        if not isinstance(message.get("content"), str):
            return Rejected("api_malformed_response", "choices[0].message.content is not a string")
        return to_answer(message["content"], request.prompt, truncated=finish == "length", tokens=tokens,
                         seconds=seconds)

    def _payload(self, request: VlmRequest) -> dict[str, Any]:
        images = [{"type": "image_url",
                   "image_url": {"url": f"data:image/png;base64,{base64.b64encode(encode_png(image)).decode()}"}}
                  for image in request.images]
        payload: dict[str, Any] = {
            "model": self.cfg.model,
            "messages": [{"role": "user", "content": [*images, {"type": "text", "text": request.prompt.text}]}],
            "max_tokens": request.max_new_tokens, "seed": request.seed}
        if self.cfg.temperature is not None:
            payload["temperature"] = self.cfg.temperature
        if request.prompt.schema is not None:
            name = request.prompt.template_id.split("/")[0]  # the template's name: [a-z_], as the API requires
            payload["response_format"] = {"type": "json_schema",
                                          "json_schema": {"name": name, "schema": request.prompt.schema,
                                                          "strict": True}}
        return payload


def _first_choice(body: bytes) -> tuple[dict, int | None]:
    """choices[0] of a chat completion (its message an object) and the completion tokens, if reported."""
    try:
        payload = json.loads(body)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise Rejected("api_malformed_response", f"the body is not JSON: {e}") from None
    choices = payload.get("choices") if isinstance(payload, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict) \
            or not isinstance(choices[0].get("message"), dict):
        raise Rejected("api_malformed_response", "the body has no choices[0].message object")
    usage = payload.get("usage")
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return choices[0], tokens if isinstance(tokens, int) else None
