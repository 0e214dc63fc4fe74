"""The API editor against a real HTTP server on 127.0.0.1 (tests/http_fixture.py): the request it sends, the
two result forms, retries and their timing, what ends a pair as rejected and what fails the batch, the key's
confinement to the Authorization header, the concurrency bound and the rate limit."""
from __future__ import annotations

import base64
import io
import zlib
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from manifests.images import encode_png
from manifests.rejected import Rejected
from tests.badinputs import raw_png
from tests.http_fixture import ApiServer, Reply
from workers.api_editor import ApiEditor, ApiError, ApiUnavailable, MissingApiKey
from workers.http_api import retry_after
from workers.base import EditOutput, EditRequest

KEY_ENV = "X2EDIT_TEST_IMAGE_API_KEY"
KEY = "sk-test-6f1d2c9a0b7e4e55"


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    with ApiServer() as api:
        yield api


def make_editor(server: ApiServer, **overrides) -> ApiEditor:
    settings = dict(base_url=f"{server.url}/v1", model="gpt-image-1", api_key_env=KEY_ENV,
                    tasks=("color_change", "style_change"), timeout_s=2.0, max_retries=2, backoff_s=0.01,
                    max_backoff_s=2.0)
    return ApiEditor(ApiEditor.Config(**(settings | overrides)))


def image(seed: int = 0, h: int = 24, w: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def request(text: str = "make the car blue", seed: int = 0) -> EditRequest:
    return EditRequest(op="instruction", params={}, instruction_en=text, instruction_zh="把车变成蓝色", seed=seed,
                       subject=None)


def blue_png(size: int = 64) -> bytes:
    return encode_png(np.full((size, size, 3), (0, 0, 255), dtype=np.uint8))


def b64_reply(data: bytes) -> Reply:
    return Reply(body={"data": [{"b64_json": base64.b64encode(data).decode()}]})


def test_b64_result_and_the_request_sent(server):
    server.replies = [b64_reply(blue_png())]
    source = image()
    [out] = make_editor(server).edit([source], [request()])
    assert isinstance(out, EditOutput) and out.source is source and out.mask is None
    assert out.edited.shape == source.shape  # the 64x64 answer is resized back to the 24x32 source
    assert np.all(out.edited[..., 2] > 200) and np.all(out.edited[..., 0] < 50)
    [post] = server.posts()
    assert post.path == "/v1/images/edits"
    assert post.headers["Authorization"] == f"Bearer {KEY}"
    assert {k: v for k, v in post.fields.items() if k != "image"} == {
        "model": b"gpt-image-1", "prompt": b"make the car blue", "size": b"1024x1024", "n": b"1", "quality": b"auto"}
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(post.fields["image"]))), source)  # PNG: lossless


def test_url_result_is_downloaded_without_the_key(server):
    server.replies = [Reply(body={"data": [{"url": f"{server.url}/results/out.png?sig=abc"}]})]
    server.files["/results/out.png?sig=abc"] = blue_png()
    [out] = make_editor(server).edit([image()], [request()])
    assert isinstance(out, EditOutput) and np.all(out.edited[..., 2] > 200)
    [get] = [s for s in server.seen if s.method == "GET"]
    assert "Authorization" not in get.headers  # a result link may live on another host


def test_timeout_is_retried(server):
    server.replies = [Reply(delay_s=1.5, body={"data": []}), b64_reply(blue_png())]
    [out] = make_editor(server, timeout_s=0.3).edit([image()], [request()])
    assert isinstance(out, EditOutput)
    assert len(server.posts()) == 2


def test_timeouts_to_the_last_retry_fail_the_batch(server):
    server.replies = [Reply(delay_s=1.0, body={"data": []})]
    with pytest.raises(ApiUnavailable, match="ReadTimeout"):
        make_editor(server, timeout_s=0.2, max_retries=1).edit([image()], [request()])
    assert len(server.posts()) == 2


def test_429_waits_forretry_after(server):
    server.replies = [Reply(429, {"error": {"message": "rate limited"}}, {"Retry-After": "1"}), b64_reply(blue_png())]
    [out] = make_editor(server).edit([image()], [request()])
    first, second = server.posts()
    assert isinstance(out, EditOutput)
    assert second.at - first.at >= 1.0


def test_retry_after_forms():
    soon = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert retry_after("2") == 2.0 and retry_after("0.5") == 0.5
    assert 20 < retry_after(soon) <= 30
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: now
    assert retry_after("soon") is None and retry_after(None) is None


def test_500_then_success(server):
    server.replies = [Reply(500, b"upstream hiccup"), b64_reply(blue_png())]
    [out] = make_editor(server).edit([image()], [request()])
    assert isinstance(out, EditOutput)
    assert len(server.posts()) == 2


def test_400_is_rejected_at_once_with_the_server_text_and_no_key(server):
    refusal = f"Your request was rejected by the safety system (key {KEY}). " + "details " * 200
    server.replies = [Reply(400, {"error": {"message": refusal, "code": "moderation_blocked"}})]
    [out] = make_editor(server).edit([image()], [request()])
    assert isinstance(out, Rejected) and out.reason == "api_bad_request"
    assert "rejected by the safety system" in out.message and len(out.message) < 400
    assert KEY not in str(out)
    assert len(server.posts()) == 1


def test_401_fails_the_batch_without_retry_or_key(server):
    server.replies = [Reply(401, {"error": {"message": f"Incorrect API key provided: {KEY}"}})]
    with pytest.raises(ApiError) as caught:
        make_editor(server).edit([image()], [request()])
    assert "401" in str(caught.value) and KEY not in str(caught.value)
    assert len(server.posts()) == 1


def test_exhausted_retries_fail_the_batch_and_keep_the_paid_edits(server):
    """Retries spent: the service, not the pair, failed, so the batch raises (the stage records *failed*).
    The edit that came back is not bought again when the stage retries its pair alone."""
    server.replies = [b64_reply(blue_png())] + [Reply(503, f"overloaded {KEY}".encode())]
    editor = make_editor(server, concurrency=1)
    good, bad = (image(1), request("make it blue")), (image(2), request("make it red"))
    with pytest.raises(ApiUnavailable) as caught:
        editor.edit([good[0], bad[0]], [good[1], bad[1]])
    assert "3 times" in str(caught.value) and KEY not in str(caught.value)
    assert len(server.posts()) == 1 + 3  # one success, then the first try and 2 retries
    [again] = editor.edit([good[0]], [good[1]])
    assert isinstance(again, EditOutput) and again.source is good[0]
    assert len(server.posts()) == 4


@pytest.mark.parametrize("reply", [
    Reply(body=b"<html>502 Bad Gateway</html>"),
    Reply(body={"created": 1}),
    Reply(body={"data": []}),
    Reply(body={"data": [{"revised_prompt": "no image"}]}),
    Reply(body={"data": [{"b64_json": "this is not base64!"}]}),
], ids=["html", "no_data", "empty_data", "no_image", "bad_base64"])
def test_malformed_response_is_rejected(server, reply):
    server.replies = [reply]
    [out] = make_editor(server).edit([image()], [request()])
    assert isinstance(out, Rejected) and out.reason == "api_malformed_response"
    assert len(server.posts()) == 1


def claims_30000_squared() -> bytes:
    """A PNG whose header claims 30000 x 30000 (900 megapixels) in a few dozen bytes."""
    return raw_png(30000, 30000, zlib.compress(b"\x00" * 64))


@pytest.mark.parametrize(("result", "reason"), [
    (claims_30000_squared(), "too_many_pixels"),
    (b"GIF89a but not really", "not_an_image"),
    (blue_png()[:60], "truncated_image"),
])
def test_result_goes_through_the_safe_decoder(server, result, reason):
    server.replies = [b64_reply(result)]
    [out] = make_editor(server).edit([image()], [request()])
    assert isinstance(out, Rejected) and out.reason == reason


def test_oversized_response_is_rejected(server):
    server.replies = [b64_reply(encode_png(image(h=256, w=256)))]
    [out] = make_editor(server, max_response_bytes=10_000).edit([image()], [request()])
    assert isinstance(out, Rejected) and out.reason == "api_response_too_large"


def test_missing_key_is_an_error_at_first_use(server, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    editor = make_editor(server)  # construction needs no key: the instruct stage builds editors to ask
    assert editor.covers() == {"color_change", "style_change"}
    with pytest.raises(MissingApiKey, match=KEY_ENV):
        editor.edit([image()], [request()])
    assert server.seen == []


def test_provenance_names_the_host_not_the_key(server):
    editor = make_editor(server)
    assert editor.backend == "api" and editor.follows_instructions
    server.replies = [b64_reply(blue_png())]
    editor.edit([image()], [request()])
    provenance = editor.provenance()
    assert provenance["host"] == server.url.removeprefix("http://")
    assert provenance["model"] == "gpt-image-1" and provenance["size"] == "1024x1024"
    assert KEY not in repr(provenance) and KEY not in repr(vars(editor))


def test_concurrency_is_bounded_and_order_kept(server):
    server.replies = [Reply(delay_s=0.2, echo_image=True)]
    sources = [image(seed) for seed in range(6)]
    outs = make_editor(server, concurrency=2).edit(sources, [request(seed=s) for s in range(6)])
    assert 1 <= server.max_in_flight <= 2  # never more than the bound (2 when the threads overlap in time)
    assert all(np.array_equal(out.edited, src) for out, src in zip(outs, sources))


def test_rate_limit_spaces_requests(server):
    server.replies = [b64_reply(blue_png())]
    make_editor(server, concurrency=4, requests_per_minute=600).edit(  # one start per 0.1 s
        [image(s) for s in range(4)], [request(seed=s) for s in range(4)])
    arrivals = sorted(s.at for s in server.posts())
    assert len(arrivals) == 4 and arrivals[-1] - arrivals[0] >= 0.25  # 0.3 s nominal, less network jitter


@pytest.mark.parametrize(("override", "key"), [
    ({"tasks": ("colour_change",)}, "tasks"),
    ({"tasks": ()}, "tasks"),
    ({"api_key_env": "sk-proj-abc123"}, "api_key_env"),
    ({"base_url": "ftp://example.com/v1"}, "base_url"),
    ({"base_url": "https://example.com/v1?key=abc"}, "base_url"),
    ({"size": "big"}, "size"),
    ({"max_backoff_s": 0.001}, "max_backoff_s"),
    ({"temperature": 0.5}, "temperature"),
])
def test_config_errors_name_the_key(server, override, key):
    with pytest.raises(ValidationError, match=key):
        make_editor(server, **override)
