"""The VLM worker: the one reply parser on recorded, realistic replies; the transformers backend on the tiny
random-weight Qwen2.5-VL (`tiny:qwen2.5-vl`, loaded through from_pretrained) with xgrammar-constrained decoding;
the OpenAI-compatible backend against a real HTTP server on 127.0.0.1 (tests/http_fixture.py). Throughput is
printed (`pytest -s`), never asserted."""
from __future__ import annotations

import base64
import io
import json
import time

import jsonschema
import numpy as np
import pytest
from PIL import Image
from pydantic import TypeAdapter, ValidationError

from manifests.rejected import Rejected
from tests.http_fixture import ApiServer, Reply
from workers.http_api import ApiError, ApiUnavailable, MissingApiKey
from workers.vlm import (OpenAiVlmConfig, TransformersVlmConfig, VlmAnswer, VlmConfig, VlmRequest, build_vlm,
                         parse_reply, to_answer)
from workers.vlm_openai import OpenAiVlm
from workers.vlm_prompts import render

KEY_ENV = "X2EDIT_TEST_VLM_API_KEY"
KEY = "sk-test-vlm-3c2f9e81d0a4"
YES_NO = render("ask_yes_no", "en", question="Is there a red car?")
VIESCORE = render("viescore_sc", "en", instruction="make the car blue")
PROPOSE = render("propose", "en", tasks=["color_change", "style_change"])
JUDGE_TEXT = render("judge_imgedit_text", "zh", instruction="把车变成蓝色")
JUDGE_JSON = render("judge_imgedit_json", "en", instruction="make the car blue")


def image(seed: int = 0, h: int = 40, w: int = 56) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --- the parser ---------------------------------------------------------------------------------------------------

VALID = [
    (YES_NO, '{"answer": "yes"}', {"answer": "yes"}),
    (YES_NO, '```json\n{"answer": "no"}\n```', {"answer": "no"}),  # Qwen2.5-VL's habit when unconstrained
    (VIESCORE, '{"reasoning": "The car is blue now; the street is unchanged.", "editing_success": 9, '
               '"over_editing": 8}',
     {"reasoning": "The car is blue now; the street is unchanged.", "editing_success": 9, "over_editing": 8}),
    (PROPOSE, '{"style_change": {"en": "Render the street as a watercolor painting", "zh": "把街道画成水彩画"}, '
              '"color_change": {"en": "", "zh": ""}}',
     {"style_change": {"en": "Render the street as a watercolor painting", "zh": "把街道画成水彩画"},
      "color_change": {"en": "", "zh": ""}}),
    (JUDGE_TEXT, "Brief reasoning: The car is blue, its reflections kept.\nScore 1: 5\nScore 2: 4 (slight halo)\n"
                 "Objects match: True\n",
     {"reasoning": "The car is blue, its reflections kept.", "instruction_following": 5, "naturalness": 4,
      "objects_match": True}),
]


@pytest.mark.parametrize("prompt, raw, record", VALID)
def test_valid_replies_parse_to_their_record(prompt, raw, record):
    assert parse_reply(raw, prompt, truncated=False) == record
    # A reply complete at the token limit is complete: the limit is a reason only for a reply that fails.
    assert parse_reply(raw, prompt, truncated=True) == record


def test_the_judges_lines_give_the_json_variants_record():
    record = parse_reply(VALID[-1][1], JUDGE_TEXT, truncated=False)
    jsonschema.validate(record, JUDGE_JSON.schema)


BROKEN = [
    (YES_NO, "Yes, there is a red car.", "vlm_unparseable", "not JSON"),
    (YES_NO, 'Sure! Here is the answer: {"answer": "yes"}', "vlm_unparseable", "not JSON"),  # never dug out
    (YES_NO, '{"answer": "yes", "answer": "no"}', "vlm_unparseable", "['answer'] given twice"),
    (YES_NO, '{"answer": "Yes"}', "vlm_schema_mismatch", "$.answer"),
    (YES_NO, '{"answer": "yes", "confidence": 0.9}', "vlm_schema_mismatch", "Additional properties"),
    (YES_NO, '["yes"]', "vlm_schema_mismatch", "$: "),
    (VIESCORE, '{"reasoning": "ok", "editing_success": "8", "over_editing": 7}', "vlm_schema_mismatch",
     "$.editing_success"),
    (VIESCORE, '{"reasoning": "ok", "editing_success": 11, "over_editing": 7}', "vlm_schema_mismatch",
     "$.editing_success: 11 is greater than the maximum of 10"),
    (VIESCORE, '{"reasoning": "ok", "editing_success": 8}', "vlm_schema_mismatch", "'over_editing' is a required"),
    (JUDGE_TEXT, "Brief reasoning: fine.\nScore 1: 5\nScore 2: 4\n", "vlm_unparseable", "no line for objects_match"),
    (JUDGE_TEXT, "Brief reasoning: fine.\nScore 1: 7\nScore 2: 4\nObjects match: True", "vlm_unparseable",
     "no line for instruction_following"),
]


@pytest.mark.parametrize("prompt, raw, reason, detail", BROKEN)
def test_broken_replies_are_rejected_with_a_reason_never_guessed(prompt, raw, reason, detail):
    item = to_answer(raw, prompt, truncated=False, tokens=12, seconds=0.1)
    assert isinstance(item, Rejected) and item.reason == reason and detail in item.message


@pytest.mark.parametrize("prompt, raw", [
    (PROPOSE, '{"style_change": {"en": "Render the street as a watercolor painting", "zh": "把街道画成'),
    (PROPOSE, '```json\n{"style_change": {"en": "Render the street'),
    (JUDGE_TEXT, "Brief reasoning: The car is blue, its reflections kept.\nScore 1: 5\nSco"),
])
def test_a_cut_reply_is_truncated_when_it_hit_the_limit_else_unparseable(prompt, raw):
    assert to_answer(raw, prompt, truncated=True, tokens=64, seconds=1.0).reason == "vlm_truncated"
    assert to_answer(raw, prompt, truncated=False, tokens=64, seconds=1.0).reason == "vlm_unparseable"


def test_a_long_reply_is_cut_short_in_the_ledger_message():
    item = to_answer("x" * 10_000, YES_NO, truncated=False, tokens=None, seconds=0.0)
    assert item.reason == "vlm_unparseable" and len(item.message) < 300


def test_requests_must_bring_the_prompts_images():
    with pytest.raises(ValueError, match=r"takes 2 image\(s\)"):
        VlmRequest([image()], VIESCORE)
    with pytest.raises(ValueError, match="RGB uint8"):
        VlmRequest([image().astype(np.float32)], YES_NO)


def test_the_recipe_block_chooses_the_backend_and_unknown_keys_fail():
    adapter = TypeAdapter(VlmConfig)
    cfg = adapter.validate_python({"backend": "openai", "base_url": "http://127.0.0.1:8000/v1/",
                                   "api_key_env": KEY_ENV, "model": "Qwen/Qwen2.5-VL-72B-Instruct"})
    assert isinstance(cfg, OpenAiVlmConfig) and cfg.base_url == "http://127.0.0.1:8000/v1"
    assert isinstance(build_vlm(cfg), OpenAiVlm)  # cheap: nothing is read or called
    assert isinstance(adapter.validate_python({"backend": "transformers", "model": "tiny:qwen2.5-vl"}),
                      TransformersVlmConfig)
    with pytest.raises(ValidationError, match="top_kk"):
        adapter.validate_python({"backend": "transformers", "model": "m", "top_kk": 5})
    with pytest.raises(ValidationError, match="backend"):
        adapter.validate_python({"backend": "vllm-typo", "model": "m"})


# --- transformers + xgrammar on the tiny Qwen2.5-VL ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_vlm_cfg(tmp_path_factory):
    """`tiny:qwen2.5-vl` built into a fresh folder: the test proves the builder, not a cache."""
    pytest.importorskip("xgrammar")
    from workers.tiny_models import TINY_MODELS_ENV

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(TINY_MODELS_ENV, str(tmp_path_factory.mktemp("tiny-models")))
        yield TransformersVlmConfig(model="tiny:qwen2.5-vl", dtype="float32", batch_size=2)


def yes_no_requests(n: int = 3) -> list[VlmRequest]:
    """Prompts with none, one and two images, so a batch mixes image counts."""
    prompts = [render("ask_prompt_valid", "zh", prompt="一只戴帽子的猫"), YES_NO, render("ask_same_style", "en")]
    return [VlmRequest([image(i + k) for k in range(len(prompts[i % 3].images))], prompts[i % 3], max_new_tokens=32,
                       seed=i) for i in range(n)]


def test_tiny_qwen25vl_loads_and_answers_schema_valid_json_under_constraint(tiny_vlm_cfg):
    vlm = build_vlm(tiny_vlm_cfg)
    requests = yes_no_requests(3) + [VlmRequest([image(9)], PROPOSE, max_new_tokens=40)]
    items = vlm.ask(requests)
    model, processor, _ = vlm.pair()
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"  # through from_pretrained, from disk
    assert vlm.provenance()["revision"] == "random-weights"
    assert vlm.provenance()["constrained"].startswith("xgrammar ")
    for request, item in zip(requests[:3], items[:3]):
        assert isinstance(item, VlmAnswer), item
        jsonschema.validate(item.parsed, request.prompt.schema)
        assert item.raw == json.dumps(item.parsed)  # no free whitespace, nothing around the object
        assert 0 < item.tokens <= request.max_new_tokens
    # Random weights never close the proposal's free strings: the grammar keeps the shape, the limit ends it.
    assert isinstance(items[3], Rejected) and items[3].reason == "vlm_truncated"
    assert items[3].message.startswith("stopped at the token limit: '{\"style_change\": {\"en\": \"")


def test_greedy_is_deterministic_and_sampling_reproducible_from_the_seeds(tiny_vlm_cfg):
    requests = yes_no_requests(3)
    greedy = build_vlm(tiny_vlm_cfg)
    assert [a.raw for a in greedy.ask(requests)] == [a.raw for a in greedy.ask(requests)]
    sampled = build_vlm(tiny_vlm_cfg.model_copy(update={"temperature": 1.0, "top_k": 0}))
    first, second = sampled.ask(requests), sampled.ask(requests)
    assert all(isinstance(a, VlmAnswer) for a in first) and [a.raw for a in first] == [a.raw for a in second]
    assert sampled.provenance()["temperature"] == 1.0 and sampled.provenance()["top_k"] == 0


def test_unconstrained_decoding_ends_in_reasons_not_exceptions(tiny_vlm_cfg):
    vlm = build_vlm(tiny_vlm_cfg.model_copy(update={"constrained": False}))
    requests = yes_no_requests(2) + [VlmRequest([image(1), image(2)], JUDGE_TEXT, max_new_tokens=24)]
    for item in vlm.ask(requests):
        assert isinstance(item, VlmAnswer) or item.reason in {"vlm_truncated", "vlm_unparseable",
                                                              "vlm_schema_mismatch"}
    assert vlm.provenance()["constrained"] is None


def test_transformers_throughput_at_batch_1_2_4(tiny_vlm_cfg):
    requests = yes_no_requests(8)
    for batch in (1, 2, 4):
        vlm = build_vlm(tiny_vlm_cfg.model_copy(update={"batch_size": batch}))
        vlm.ask(requests[:1])  # load, and warm the kernels
        start = time.perf_counter()
        items = vlm.ask(requests)
        rate = len(requests) / (time.perf_counter() - start)
        assert all(isinstance(item, VlmAnswer) for item in items)
        print(f"\ntransformers tiny Qwen2.5-VL + xgrammar, batch {batch}: {rate:.1f} samples/s")


# --- an OpenAI-compatible endpoint ------------------------------------------------------------------------------

@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    with ApiServer() as api:
        yield api


def make_vlm(server: ApiServer, **overrides) -> OpenAiVlm:
    settings = dict(base_url=f"{server.url}/v1", api_key_env=KEY_ENV, model="qwen2.5-vl-72b", timeout_s=2.0,
                    max_retries=2, backoff_s=0.01, max_backoff_s=2.0)
    return build_vlm(OpenAiVlmConfig(**(settings | overrides)))


def chat(content: str | None, finish: str = "stop", **message) -> Reply:
    return Reply(body={"id": "chatcmpl-1", "object": "chat.completion", "model": "qwen2.5-vl-72b",
                       "choices": [{"index": 0, "finish_reason": finish,
                                    "message": {"role": "assistant", "content": content, **message}}],
                       "usage": {"prompt_tokens": 812, "completion_tokens": 7, "total_tokens": 819}})


def test_a_valid_answer_and_the_request_sent(server):
    server.replies = [chat('{"answer": "yes"}')]
    picture = image(3)
    [answer] = make_vlm(server, temperature=0.2).ask([VlmRequest([picture], YES_NO, max_new_tokens=64, seed=7)])
    assert answer.parsed == {"answer": "yes"} and answer.tokens == 7 and answer.seconds > 0
    [seen] = server.posts()
    assert seen.path == "/v1/chat/completions" and seen.headers["Content-Type"] == "application/json"
    sent = json.loads(seen.body)
    assert (sent["model"], sent["max_tokens"], sent["seed"], sent["temperature"]) == ("qwen2.5-vl-72b", 64, 7, 0.2)
    [message] = sent["messages"]
    first, text = message["content"]
    assert text == {"type": "text", "text": YES_NO.text}  # the images, then the text
    url = first["image_url"]["url"]
    assert first["type"] == "image_url" and url.startswith("data:image/png;base64,")
    decoded = np.array(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
    assert np.array_equal(decoded, picture)
    assert sent["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "ask_yes_no", "schema": YES_NO.schema, "strict": True}}


def test_the_key_goes_only_into_the_authorization_header(server):
    server.replies = [chat('{"answer": "no"}')]
    vlm = make_vlm(server)
    vlm.ask([VlmRequest([image()], YES_NO)])
    [seen] = server.posts()
    assert seen.headers["Authorization"] == f"Bearer {KEY}"
    others = {k: v for k, v in seen.headers.items() if k != "Authorization"}
    assert KEY not in seen.path + json.dumps(others) + seen.body.decode()
    assert KEY not in json.dumps(vlm.provenance()) + repr(vlm.cfg)


def test_a_line_format_prompt_sends_no_schema_and_parses_its_lines(server):
    server.replies = [chat(VALID[-1][1])]
    [answer] = make_vlm(server).ask([VlmRequest([image(1), image(2)], JUDGE_TEXT)])
    assert answer.parsed["instruction_following"] == 5 and answer.parsed["objects_match"] is True
    sent = json.loads(server.posts()[0].body)
    assert "response_format" not in sent and len(sent["messages"][0]["content"]) == 3


def test_429_waits_for_retry_after_then_succeeds(server):
    server.replies = [Reply(429, {"error": {"message": "rate limited"}}, {"Retry-After": "1"}),
                      chat('{"answer": "yes"}')]
    [answer] = make_vlm(server).ask([VlmRequest([image()], YES_NO)])
    first, second = server.posts()
    assert answer.parsed == {"answer": "yes"} and second.at - first.at >= 1.0


def test_500_then_success(server):
    server.replies = [Reply(500, b"upstream crashed"), chat('{"answer": "no"}')]
    [answer] = make_vlm(server).ask([VlmRequest([image()], YES_NO)])
    assert answer.parsed == {"answer": "no"} and len(server.posts()) == 2


def test_a_timeout_is_retried_and_timeouts_to_the_last_retry_fail_the_batch(server):
    server.replies = [Reply(delay_s=0.6, body=b"late"), chat('{"answer": "yes"}')]
    [answer] = make_vlm(server, timeout_s=0.2).ask([VlmRequest([image()], YES_NO)])
    assert answer.parsed == {"answer": "yes"} and len(server.posts()) == 2
    server.replies = [Reply(delay_s=0.6, body=b"late")]
    with pytest.raises(ApiUnavailable, match="failed 2 times"):
        make_vlm(server, timeout_s=0.2, max_retries=1).ask([VlmRequest([image()], YES_NO)])


@pytest.mark.parametrize("reply, detail", [
    (Reply(body=b"<html>gateway</html>"), "not JSON"),
    (Reply(body={"choices": []}), "no choices[0].message"),
    (chat(None), "content is not a string"),
])
def test_a_malformed_body_is_rejected(server, reply, detail):
    server.replies = [reply]
    [item] = make_vlm(server).ask([VlmRequest([image()], YES_NO)])
    assert isinstance(item, Rejected) and item.reason == "api_malformed_response" and detail in item.message


@pytest.mark.parametrize("reply, reason", [
    (chat('{"reasoning": "blue", "editing_success": 12, "over_editing": 5}'), "vlm_schema_mismatch"),
    (chat('{"reasoning": "The car is now bl', finish="length"), "vlm_truncated"),
    (chat(None, refusal="I can't help with that."), "vlm_refused"),
    (Reply(400, {"error": {"message": "image too large", "code": "invalid_image"}}), "vlm_bad_request"),
])
def test_unusable_replies_end_the_request_with_a_reason(server, reply, reason):
    server.replies = [reply]
    [item] = make_vlm(server).ask([VlmRequest([image(1), image(2)], VIESCORE)])
    assert isinstance(item, Rejected) and item.reason == reason
    assert len(server.posts()) == 1  # none of these is retried


def test_a_refused_configuration_fails_the_batch(server, monkeypatch):
    server.replies = [Reply(401, {"error": {"message": f"bad key {KEY}"}})]
    with pytest.raises(ApiError, match=r"HTTP 401.*bad key \*\*\*"):  # the echoed key is scrubbed
        make_vlm(server).ask([VlmRequest([image()], YES_NO)])
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(MissingApiKey, match=KEY_ENV):
        make_vlm(server).ask([VlmRequest([image()], YES_NO)])


def test_concurrency_is_bounded_and_order_kept(server):
    server.replies = [Reply(delay_s=0.1, body=chat('{"answer": "yes"}').body)]
    requests = [VlmRequest([image(i)], YES_NO, seed=i) for i in range(6)]
    items = make_vlm(server, concurrency=2).ask(requests)
    assert all(isinstance(item, VlmAnswer) for item in items) and server.max_in_flight <= 2
    assert sorted(json.loads(s.body)["seed"] for s in server.posts()) == list(range(6))


def test_openai_client_throughput_at_concurrency_1_2_4(server):
    """The client's own cost (PNG + base64 + HTTP + parse) against a server that answers at once."""
    server.replies = [chat('{"answer": "yes"}')]
    requests = [VlmRequest([image(i, 256, 256)], YES_NO) for i in range(16)]
    for concurrency in (1, 2, 4):
        start = time.perf_counter()
        items = make_vlm(server, concurrency=concurrency).ask(requests)
        rate = len(requests) / (time.perf_counter() - start)
        assert all(isinstance(item, VlmAnswer) for item in items)
        print(f"\nopenai backend client, concurrency {concurrency}: {rate:.0f} samples/s (256² PNG, local server)")
