"""An OpenAI-compatible image-edit API as an Editor: `POST {base_url}/images/edits` (gpt-image-1 and the like).

The reference's high-fidelity editor is GPT-Image at 1024x1024, quality auto, behind a gateway
(reference-code.md §1.7); this is the same call against any OpenAI-compatible endpoint. The key is read from
the environment variable the recipe names at each use, never stored, and goes into the Authorization header
only: never into provenance, a log line or an error message (server error texts are scrubbed of it).

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
import logging
import os
import random
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Callable, ClassVar, Literal
from urllib.parse import urlsplit

import numpy as np
import requests
from PIL import Image
from pydantic import Field, field_validator, model_validator
from requests.auth import AuthBase

from manifests.config import Strict
from manifests.images import decode_image, encode_png
from manifests.rejected import Rejected
from manifests.taxonomy import task_by_name
from workers.base import EditOutput, EditRequest

VERSION = "1"
log = logging.getLogger(__name__)

_REFUSED = frozenset({400, 413, 415, 422})  # the request itself is refused: this pair's image or instruction
_ERROR_TEXT_CHARS = 300
_KEEP_FINISHED = 64  # finished edits kept from failed batches (the stage's row-by-row retry takes them back)
_NETWORK_ERRORS = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


class MissingApiKey(RuntimeError):
    """The environment variable the recipe names holds no key."""


class ApiError(RuntimeError):
    """The API refuses the configuration (key, model, URL): no pair can succeed, so no pair is rejected."""


class ApiUnavailable(RuntimeError):
    """The API stayed unreachable, overloaded or slow through every retry."""


class _Retryable(Exception):
    """One attempt failed in a way that another attempt may not (the server may say when to try again)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _Bearer(AuthBase):
    """An auth object rather than a header: requests then drops it on a redirect to another host and never
    replaces it with ~/.netrc credentials."""

    def __init__(self, key: str) -> None:
        self._key = key

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._key}"
        return request


class ApiEditor:
    backend: ClassVar[str] = "api"
    follows_instructions: ClassVar[bool] = True

    class Config(Strict):
        backend: Literal["api"] = "api"
        base_url: str  # e.g. https://api.openai.com/v1
        model: str = Field(min_length=1)  # e.g. gpt-image-1
        # The NAME of the variable that holds the key (upper case, so a pasted key fails validation).
        api_key_env: str = Field(pattern=r"^[A-Z_][A-Z0-9_]*$")
        tasks: tuple[str, ...] = Field(min_length=1)  # what this model, as configured, is trusted to do
        size: str = Field("1024x1024", pattern=r"^(auto|[1-9][0-9]*x[1-9][0-9]*)$")
        quality: str | None = "auto"  # None: not sent (models without a quality setting reject it)
        timeout_s: float = Field(180.0, gt=0)  # per attempt: until the whole body has arrived
        max_retries: int = Field(4, ge=0)
        backoff_s: float = Field(1.0, gt=0)  # base of the exponential backoff (full jitter)
        max_backoff_s: float = Field(60.0, gt=0)  # caps the backoff and the server's Retry-After
        requests_per_minute: float | None = Field(None, gt=0)  # per actor, retries included; None: unlimited
        concurrency: int = Field(4, ge=1)  # requests in flight per actor
        max_pixels: int = Field(4096 * 4096, gt=0)  # of a returned image, checked before it is decoded
        max_response_bytes: int = Field(64 << 20, gt=0)  # of a response body or a downloaded result

        @field_validator("base_url")
        @classmethod
        def _http_url(cls, url: str) -> str:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.port == 0:  # .port: a
                raise ValueError("base_url must be an http(s) URL")  # ValueError when not a number in range
            if parts.username or parts.password or parts.query or parts.fragment:
                raise ValueError("base_url takes no credentials, query or fragment (the key comes from api_key_env)")
            return url.rstrip("/")

        @field_validator("tasks")
        @classmethod
        def _known_tasks(cls, tasks: tuple[str, ...]) -> tuple[str, ...]:
            for task in tasks:
                task_by_name(task)  # an UnknownTaskError (a ValueError) names the known tasks
            return tasks

        @model_validator(mode="after")
        def _backoff_range(self) -> ApiEditor.Config:
            if self.max_backoff_s < self.backoff_s:
                raise ValueError(f"max_backoff_s ({self.max_backoff_s}) < backoff_s ({self.backoff_s})")
            return self

    def __init__(self, cfg: ApiEditor.Config) -> None:
        self.cfg = cfg
        self._host = urlsplit(cfg.base_url).netloc  # host[:port]: the validator allows no credentials in it
        self._slot_lock = threading.Lock()
        self._next_slot = 0.0  # time.monotonic() before which no request may start
        self._finished: OrderedDict[str, np.ndarray | Rejected] = OrderedDict()

    def covers(self) -> frozenset[str]:
        return frozenset(self.cfg.tasks)

    def provenance(self) -> dict:
        return {"worker": self.backend, "version": VERSION, "host": self._host, "model": self.cfg.model,
                "size": self.cfg.size, "quality": self.cfg.quality}

    def edit(self, images: list[np.ndarray], requests: list[EditRequest]) -> list[EditOutput | Rejected]:
        if len(images) != len(requests):
            raise ValueError(f"{len(images)} images for {len(requests)} requests")
        self._api_key()  # a missing key fails the batch before any request, naming the variable
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
        body = self._with_retries(f"POST {self._host}/images/edits", lambda: self._post(fields, png))
        item = _first_item(body)
        if isinstance(item.get("b64_json"), str):
            try:
                data = base64.b64decode(item["b64_json"], validate=True)
            except binascii.Error as exc:
                raise Rejected("api_malformed_response", f"data[0].b64_json is not base64: {exc}") from exc
        elif isinstance(item.get("url"), str):
            url = item["url"]
            data = self._with_retries(f"GET result from {urlsplit(url).hostname}", lambda: self._download(url))
        else:
            raise Rejected("api_malformed_response", "data[0] has neither b64_json nor url")
        try:
            return decode_image(data, max_pixels=self.cfg.max_pixels)
        except Rejected as exc:
            raise Rejected(exc.reason, f"the API's result: {exc.message}") from exc

    def _post(self, fields: dict[str, str], png: bytes) -> bytes:
        self._wait_for_slot()
        status, body = self._send(
            "POST", f"{self.cfg.base_url}/images/edits", data=fields,
            files={"image": ("image.png", png, "image/png")}, auth=_Bearer(self._api_key()),
            allow_redirects=False)  # a redirected POST would become a GET
        if 200 <= status < 300:
            return body
        if status in _REFUSED:
            raise Rejected("api_bad_request", f"HTTP {status}: {self._error_text(body)}")
        raise ApiError(f"HTTP {status} from {self._host}/images/edits: {self._error_text(body)}")

    def _download(self, url: str) -> bytes:
        """A result URL (often a signed link on another host): fetched without the key."""
        if urlsplit(url).scheme not in ("http", "https"):
            raise Rejected("api_malformed_response", "data[0].url is not an http(s) URL")
        status, body = self._send("GET", url)
        if 200 <= status < 300:
            return body
        raise Rejected("api_download_failed", f"HTTP {status} for the result URL: {self._error_text(body)}")

    def _send(self, method: str, url: str, **kwargs) -> tuple[int, bytes]:
        """One attempt: its status and body, bounded in size and, unlike requests' per-read timeout, in total
        time. Raises `_Retryable` on what another attempt may cure: 408 timeout, 409 conflict, 429 rate limit,
        5xx, a connection error, a timeout."""
        deadline = time.monotonic() + self.cfg.timeout_s
        try:
            with requests.request(method, url, timeout=self.cfg.timeout_s, stream=True, **kwargs) as response:
                limit = self.cfg.max_response_bytes
                declared = response.headers.get("Content-Length", "")
                if declared.isdigit() and int(declared) > limit:
                    raise Rejected("api_response_too_large", f"{declared} bytes > max_response_bytes={limit}")
                chunks, size = [], 0
                for chunk in response.iter_content(1 << 16):
                    size += len(chunk)
                    if size > limit:
                        raise Rejected("api_response_too_large", f"over max_response_bytes={limit}")
                    if time.monotonic() > deadline:
                        raise _Retryable(f"body not complete within timeout_s={self.cfg.timeout_s}")
                    chunks.append(chunk)
                body = b"".join(chunks)
                if response.status_code in (408, 409, 429) or response.status_code >= 500:
                    raise _Retryable(f"HTTP {response.status_code}: {self._error_text(body)}",
                                     _retry_after(response.headers.get("Retry-After")))
                return response.status_code, body
        except _NETWORK_ERRORS as exc:
            # The class only: requests' messages repeat the URL, and a result URL's query is a signed token.
            raise _Retryable(type(exc).__name__) from exc

    def _with_retries(self, what: str, attempt: Callable[[], bytes]) -> bytes:
        attempts = self.cfg.max_retries + 1
        for n in range(attempts):
            try:
                return attempt()
            except _Retryable as exc:
                error = exc
            if n + 1 < attempts:
                delay = self._backoff(n, error.retry_after)
                log.warning("%s: %s; retry %d/%d in %.1f s", what, error, n + 1, self.cfg.max_retries, delay)
                time.sleep(delay)
        raise ApiUnavailable(f"{what} failed {attempts} times; last: {error}")

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:  # the server knows when it will have capacity again
            return min(retry_after, self.cfg.max_backoff_s)
        # Full jitter: actors that failed together must not all come back together.
        return random.uniform(0.0, min(self.cfg.max_backoff_s, self.cfg.backoff_s * 2 ** attempt))

    def _wait_for_slot(self) -> None:
        """Space request starts evenly, 60 / requests_per_minute s apart, across this actor's threads."""
        if self.cfg.requests_per_minute is None:
            return
        with self._slot_lock:
            now = time.monotonic()
            slot = max(now, self._next_slot)
            self._next_slot = slot + 60.0 / self.cfg.requests_per_minute
        time.sleep(slot - now)

    def _api_key(self) -> str:
        """Read at each use, not at construction (editors are also built only to ask what they cover) and
        never stored, so no attribute, pickle or repr of an editor holds it."""
        key = os.environ.get(self.cfg.api_key_env, "").strip()
        if not key:
            raise MissingApiKey(f"environment variable {self.cfg.api_key_env} is not set or empty: it must "
                                f"hold the API key for {self._host} (api_key_env in the recipe)")
        return key

    def _error_text(self, body: bytes) -> str:
        """The server's error message (OpenAI's {"error": {"message": ...}} or the raw text), scrubbed of the
        key (some servers echo it) before it is cut short (a cut must not leave half a key)."""
        text = body.decode("utf-8", "replace")
        try:
            payload = json.loads(text)
        except ValueError:
            payload = None  # not JSON: the raw text is the message
        error = payload.get("error") if isinstance(payload, dict) else None
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            code = error.get("code")  # e.g. moderation_blocked: worth keeping in the ledger
            text = f"{error['message']} ({code})" if isinstance(code, str) else error["message"]
        elif isinstance(error, str):
            text = error
        key = os.environ.get(self.cfg.api_key_env, "").strip()
        if key:
            text = text.replace(key, "***")
        return " ".join(text.split())[:_ERROR_TEXT_CHARS]


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds, given as seconds or as an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    if re.fullmatch(r"\s*\d+(\.\d*)?\s*", value):
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000": UTC by RFC 5322
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


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
