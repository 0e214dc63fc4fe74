"""An OpenAI-compatible image-edit API as an Editor: `POST {base_url}/images/edits` (gpt-image-1 and the like).

The reference's high-fidelity editor is GPT-Image at 1024x1024, quality auto, behind a gateway
(reference-code.md §1.7); this is the same call against any OpenAI-compatible endpoint. The key is read from
the environment variable the recipe names at each use, never stored, and goes into the Authorization header
only: never into provenance, a log line or an error message (workers/http_api.py, which also retries).

What a request ends as:
- an `EditOutput`: the result went through the safe decoder and was resized back to the source's size;
- `Rejected`, a verdict on this pair alone: the API refuses its image or instruction (400/413/415/422:
  `api_bad_request`, e.g. a safety refusal), the body is not the documented JSON (`api_malformed_response`)
  or too large (`api_response_too_large`), the result URL answers 4xx (`api_download_failed`), or the image
  does not decode (the decoder's own reason: the ledger's stage column already says it is an edit output);
- an exception, which fails the batch: the service, not the pair, is at fault. `ApiUnavailable` after the
  last retry on 408/409/429/5xx/connection errors/timeouts, `ApiError` on any other status (401 bad key, 404
  wrong model or URL: no pair could succeed), `MissingApiKey`. The stage then retries the batch's pairs one
  by one; the edits that did come back are kept for that retry, so a paid edit is never bought twice.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar, Literal
from urllib.parse import urlsplit

import numpy as np
from PIL import Image
from pydantic import Field, field_validator

from manifests.images import decode_image, encode_png
from manifests.rejected import Rejected
from manifests.taxonomy import task_by_name
from workers.base import EditOutput, EditRequest
from workers.http_api import ApiError, ApiUnavailable, HttpApi, HttpApiConfig, MissingApiKey

__all__ = ["ApiEditor", "ApiError", "ApiUnavailable", "MissingApiKey"]

VERSION = "1"

_REFUSED = frozenset({400, 413, 415, 422})  # the request itself is refused: this pair's image or instruction
_KEEP_FINISHED = 64  # finished edits kept from failed batches (the stage's row-by-row retry takes them back)


class ApiEditor:
    backend: ClassVar[str] = "api"
    follows_instructions: ClassVar[bool] = True

    class Config(HttpApiConfig):
        backend: Literal["api"] = "api"
        model: str = Field(min_length=1)  # e.g. gpt-image-1
        tasks: tuple[str, ...] = Field(min_length=1)  # what this model, as configured, is trusted to do
        size: str = Field("1024x1024", pattern=r"^(auto|[1-9][0-9]*x[1-9][0-9]*)$")
        quality: str | None = "auto"  # None: not sent (models without a quality setting reject it)
        max_pixels: int = Field(4096 * 4096, gt=0)  # of a returned image, checked before it is decoded

        @field_validator("tasks")
        @classmethod
        def _known_tasks(cls, tasks: tuple[str, ...]) -> tuple[str, ...]:
            for task in tasks:
                task_by_name(task)  # an UnknownTaskError (a ValueError) names the known tasks
            return tasks

    def __init__(self, cfg: ApiEditor.Config) -> None:
        self.cfg = cfg
        self.http = HttpApi(cfg)
        self._finished: OrderedDict[str, np.ndarray | Rejected] = OrderedDict()

    def covers(self) -> frozenset[str]:
        return frozenset(self.cfg.tasks)

    def provenance(self) -> dict:
        return {"worker": self.backend, "version": VERSION, "host": self.http.host, "model": self.cfg.model,
                "size": self.cfg.size, "quality": self.cfg.quality}

    def edit(self, images: list[np.ndarray], requests: list[EditRequest]) -> list[EditOutput | Rejected]:
        if len(images) != len(requests):
            raise ValueError(f"{len(images)} images for {len(requests)} requests")
        self.http.api_key()  # a missing key fails the batch before any request, naming the variable
        keys = [_request_key(image, request) for image, request in zip(images, requests)]
        outcomes = [self._take_finished(key, image) for key, image in zip(keys, images)]
        with ThreadPoolExecutor(self.cfg.concurrency, thread_name_prefix="api-edit") as pool:
            futures = {i: pool.submit(self._edit_one, images[i], requests[i])
                       for i, outcome in enumerate(outcomes) if outcome is None}
        # Leaving the pool waited for every request: edits in flight are paid for, never abandoned.
        errors = [future.exception() for future in futures.values() if future.exception() is not None]
        for i, future in futures.items():
            if future.exception() is None:
                outcomes[i] = future.result()
        if errors:
            self._keep_finished(keys, outcomes)
            raise errors[0]
        return outcomes

    def _take_finished(self, key: str, image: np.ndarray) -> EditOutput | Rejected | None:
        kept = self._finished.pop(key, None)
        return EditOutput(source=image, edited=kept, mask=None) if isinstance(kept, np.ndarray) else kept

    def _keep_finished(self, keys: list[str], outcomes: list[EditOutput | Rejected | None]) -> None:
        for key, outcome in zip(keys, outcomes):
            if outcome is not None:
                self._finished[key] = outcome.edited if isinstance(outcome, EditOutput) else outcome
        while len(self._finished) > _KEEP_FINISHED:
            self._finished.popitem(last=False)

    def _edit_one(self, image: np.ndarray, request: EditRequest) -> EditOutput | Rejected:
        try:
            edited = self._request_edit(encode_png(image), request.instruction_en)
        except Rejected as rejected:
            return rejected
        height, width = image.shape[:2]
        if edited.shape[:2] != (height, width):  # the API answers at `size`; the pair keeps the source's
            edited = np.array(Image.fromarray(edited).resize((width, height), Image.Resampling.LANCZOS))
        return EditOutput(source=image, edited=edited, mask=None)

    def _request_edit(self, png: bytes, prompt: str) -> np.ndarray:
        fields = {"model": self.cfg.model, "prompt": prompt, "size": self.cfg.size, "n": "1"}
        if self.cfg.quality is not None:
            fields["quality"] = self.cfg.quality
        status, body = self.http.call(f"POST {self.http.host}/images/edits", "POST", "/images/edits", data=fields,
                                      files={"image": ("image.png", png, "image/png")})
        if status in _REFUSED:
            raise Rejected("api_bad_request", f"HTTP {status}: {self.http.error_text(body)}")
        if not 200 <= status < 300:
            raise ApiError(f"HTTP {status} from {self.http.host}/images/edits: {self.http.error_text(body)}")
        item = _first_item(body)
        if isinstance(item.get("b64_json"), str):
            try:
                data = base64.b64decode(item["b64_json"], validate=True)
            except binascii.Error as exc:
                raise Rejected("api_malformed_response", f"data[0].b64_json is not base64: {exc}") from exc
        elif isinstance(item.get("url"), str):
            data = self._download(item["url"])
        else:
            raise Rejected("api_malformed_response", "data[0] has neither b64_json nor url")
        try:
            return decode_image(data, max_pixels=self.cfg.max_pixels)
        except Rejected as exc:
            raise Rejected(exc.reason, f"the API's result: {exc.message}") from exc

    def _download(self, url: str) -> bytes:
        """A result URL (often a signed link on another host): fetched without the key or a rate-limit slot."""
        if urlsplit(url).scheme not in ("http", "https"):
            raise Rejected("api_malformed_response", "data[0].url is not an http(s) URL")
        status, body = self.http.with_retries(f"GET result from {urlsplit(url).hostname}",
                                              lambda: self.http.send("GET", url))
        if not 200 <= status < 300:
            raise Rejected("api_download_failed", f"HTTP {status} for the result URL: {self.http.error_text(body)}")
        return body


def _first_item(body: bytes) -> dict:
    try:
        payload = json.loads(body)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise Rejected("api_malformed_response", f"the body is not JSON: {exc}") from exc
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list) or not data or not isinstance(data[0], dict):
        raise Rejected("api_malformed_response", "the body has no data[0] object")
    return data[0]


def _request_key(image: np.ndarray, request: EditRequest) -> str:
    """Which pair an edit belongs to, so a retried pair finds the edit a failed batch already paid for."""
    digest = hashlib.sha256(repr(image.shape).encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    digest.update(json.dumps([request.op, request.instruction_en, request.seed]).encode())
    return digest.hexdigest()
