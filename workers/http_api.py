"""The HTTP side of every worker that calls an OpenAI-compatible API (the image-edit API editor; the chat
backend of the VLM worker): the key from a named environment variable, bounded bodies and attempts,
retries with full-jitter backoff honouring Retry-After, and a per-actor rate limit.

The key is read at each use and never stored, so no attribute, pickle, repr, provenance, log line or error
message holds it (server error texts are scrubbed of it). Statuses are the caller's to judge; what another
attempt may cure (408, 409, 429, 5xx, a connection error, a timeout) is retried here, and `ApiUnavailable`
says the service stayed away through every retry.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
import time
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Callable
from urllib.parse import urlsplit

import requests
from pydantic import Field, field_validator, model_validator
from requests.auth import AuthBase

from manifests.config import Strict
from manifests.rejected import Rejected

log = logging.getLogger(__name__)

_ERROR_TEXT_CHARS = 300
_NETWORK_ERRORS = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


class MissingApiKey(RuntimeError):
    """The environment variable the recipe names holds no key."""


class ApiError(RuntimeError):
    """The API refuses the configuration (key, model, URL): no request can succeed."""


class ApiUnavailable(RuntimeError):
    """The API stayed unreachable, overloaded or slow through every retry."""


class HttpApiConfig(Strict):
    """The connection part of a worker's recipe block (the worker's own Config extends it)."""

    base_url: str  # e.g. https://api.openai.com/v1
    # The NAME of the variable that holds the key (upper case, so a pasted key fails validation).
    api_key_env: str = Field(pattern=r"^[A-Z_][A-Z0-9_]*$")
    timeout_s: float = Field(180.0, gt=0)  # per attempt: until the whole body has arrived
    max_retries: int = Field(4, ge=0)
    backoff_s: float = Field(1.0, gt=0)  # base of the exponential backoff (full jitter)
    max_backoff_s: float = Field(60.0, gt=0)  # caps the backoff and the server's Retry-After
    requests_per_minute: float | None = Field(None, gt=0)  # per actor, retries included; None: unlimited
    concurrency: int = Field(4, ge=1)  # requests in flight per actor
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

    @model_validator(mode="after")
    def _backoff_range(self):
        if self.max_backoff_s < self.backoff_s:
            raise ValueError(f"max_backoff_s ({self.max_backoff_s}) < backoff_s ({self.backoff_s})")
        return self


class Retryable(Exception):
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


class HttpApi:
    def __init__(self, cfg: HttpApiConfig) -> None:
        self.cfg = cfg
        self.host = urlsplit(cfg.base_url).netloc  # host[:port]: the validator allows no credentials in it
        self._slot_lock = threading.Lock()
        self._next_slot = 0.0  # time.monotonic() before which no request may start

    def call(self, what: str, method: str, path: str, **kwargs) -> tuple[int, bytes]:
        """`method {base_url}{path}` with the key, after a rate-limit slot, retried; (status, body)."""
        def attempt() -> tuple[int, bytes]:
            self.wait_for_slot()
            return self.send(method, f"{self.cfg.base_url}{path}", auth=_Bearer(self.api_key()),
                             allow_redirects=False, **kwargs)  # a redirected POST would become a GET
        return self.with_retries(what, attempt)

    def send(self, method: str, url: str, **kwargs) -> tuple[int, bytes]:
        """One attempt: its status and body, bounded in size and, unlike requests' per-read timeout, in total
        time. Raises `Retryable` on what another attempt may cure: 408 timeout, 409 conflict, 429 rate limit,
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
                        raise Retryable(f"body not complete within timeout_s={self.cfg.timeout_s}")
                    chunks.append(chunk)
                body = b"".join(chunks)
                if response.status_code in (408, 409, 429) or response.status_code >= 500:
                    raise Retryable(f"HTTP {response.status_code}: {self.error_text(body)}",
                                    retry_after(response.headers.get("Retry-After")))
                return response.status_code, body
        except _NETWORK_ERRORS as exc:
            # The class only: requests' messages repeat the URL, and a result URL's query is a signed token.
            raise Retryable(type(exc).__name__) from exc

    def with_retries(self, what: str, attempt: Callable[[], tuple[int, bytes]]) -> tuple[int, bytes]:
        attempts = self.cfg.max_retries + 1
        for n in range(attempts):
            try:
                return attempt()
            except Retryable as exc:
                error = exc
            if n + 1 < attempts:
                delay = self._backoff(n, error.retry_after)
                log.warning("%s: %s; retry %d/%d in %.1f s", what, error, n + 1, self.cfg.max_retries, delay)
                time.sleep(delay)
        raise ApiUnavailable(f"{what} failed {attempts} times; last: {error}")

    def _backoff(self, attempt: int, server_says: float | None) -> float:
        if server_says is not None:  # the server knows when it will have capacity again
            return min(server_says, self.cfg.max_backoff_s)
        # Full jitter: actors that failed together must not all come back together.
        return random.uniform(0.0, min(self.cfg.max_backoff_s, self.cfg.backoff_s * 2 ** attempt))

    def wait_for_slot(self) -> None:
        """Space request starts evenly, 60 / requests_per_minute s apart, across this actor's threads."""
        if self.cfg.requests_per_minute is None:
            return
        with self._slot_lock:
            now = time.monotonic()
            slot = max(now, self._next_slot)
            self._next_slot = slot + 60.0 / self.cfg.requests_per_minute
        time.sleep(slot - now)

    def api_key(self) -> str:
        """Read at each use, not at construction (workers are also built only to ask what they cover)."""
        key = os.environ.get(self.cfg.api_key_env, "").strip()
        if not key:
            raise MissingApiKey(f"environment variable {self.cfg.api_key_env} is not set or empty: it must "
                                f"hold the API key for {self.host} (api_key_env in the recipe)")
        return key

    def error_text(self, body: bytes) -> str:
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


def retry_after(value: str | None) -> float | None:
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
