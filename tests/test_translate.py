"""The translation fallback: a tiny random-weight Marian checkpoint (workers/tiny_models.py) loads through
from_pretrained and translates deterministically, and the VLM instructor with a `translate` block fills the side
the VLM left empty, records it in the trace, and still judges the translation (the reflection and lingua). The
VLM is the OpenAI-compatible backend against tests/http_fixture.py's real server, as in test_vlm_instructor.py."""
from __future__ import annotations

import json

import pytest

from tests.http_fixture import ApiServer
from tests.test_vlm_instructor import KEY_ENV, PROPOSAL, TASKS, ask, chat, follower, keep, reflection, sent
from workers.tiny_models import TINY_MODELS_ENV, build_tiny, build_tiny_marian
from workers.translate import TranslateConfig, Translator
from workers.vlm import OpenAiVlmConfig
from workers.vlm_instructor import InstructionRejected, VlmInstructConfig, VlmInstructor
from workers.vlm_prompts import render

pytest.importorskip("sentencepiece")  # MarianTokenizer's, and so the translator's, requirement
TINY = TranslateConfig(zh_en="tiny:marian", en_zh="tiny:marian", batch_size=2)
TEXTS = ["把停在左边的红色汽车改成深蓝色。", "把整条街道变成水彩画。", "在草地上添加一只小白狗。"]


@pytest.fixture(scope="module", autouse=True)
def tiny_models(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("tiny-models")
        patch.setenv(TINY_MODELS_ENV, str(folder))
        yield folder


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test-translate")
    with ApiServer() as api:
        yield api


def test_tiny_marian_loads_through_from_pretrained_and_translates_deterministically(tmp_path):
    from transformers import MarianMTModel, MarianTokenizer

    folder = build_tiny("marian")
    assert isinstance(MarianMTModel.from_pretrained(folder, use_safetensors=True), MarianMTModel)
    tokenizer = MarianTokenizer.from_pretrained(folder)
    assert tokenizer.unk_token_id not in tokenizer(TEXTS[0])["input_ids"]  # the SentencePiece vocab covers it
    again = build_tiny_marian(tmp_path / "again")
    for name in ("source.spm", "vocab.json"):  # a rebuild trains the same SentencePiece model
        assert (again / name).read_bytes() == (folder / name).read_bytes()

    translator = Translator(TINY)
    out = translator.translate(TEXTS, "zh")  # two batches of up to two
    assert len(out) == 3 and all(isinstance(text, str) and text for text in out)
    assert Translator(TINY).translate(TEXTS, "zh") == out  # greedy: a fresh load gives the same words
    assert translator.translate(TEXTS[1:2], "zh") == out[1:2]  # and a text alone, the same as in its batch
    provenance = translator.provenance()
    assert provenance["zh_en"]["model"] == "tiny:marian" and provenance["zh_en"]["revision"] == "random-weights"
    assert provenance["en_zh"]["device"] is None  # not loaded: the en→zh direction was never asked
    assert (provenance["max_length"], provenance["decoding"]) == (256, "greedy")


def make(server: ApiServer, attempts: int = 1) -> VlmInstructor:
    cfg = VlmInstructConfig.model_validate({
        "worker": OpenAiVlmConfig(base_url=f"{server.url}/v1", api_key_env=KEY_ENV, model="qwen2.5-vl-72b",
                                  timeout_s=5.0, max_retries=0).model_dump(),
        "reflection_attempts": attempts, "translate": TINY.model_dump()})
    return VlmInstructor(0.02, 0.35, cfg, TASKS)


def outcome(instructor: VlmInstructor, task: str, server: ApiServer) -> tuple[str, dict]:
    """The verdict and trace, whether the instruction passed or ended."""
    try:
        proposal = ask(instructor, task, follower(server))
    except InstructionRejected as rejected:
        return rejected.reason, rejected.provenance
    return "passed", proposal.params["instruct"]


def test_a_proposal_in_one_language_has_the_other_translated_and_still_checked(server):
    english = PROPOSAL["style_change"]["en"]
    server.replies = [chat({**PROPOSAL, "style_change": {"en": english, "zh": ""}}), chat(keep("style_change"))]
    reason, trace = outcome(make(server), "style_change", server)
    translated = Translator(TINY).translate([english], "en")[0]
    assert trace["translated"] == {"from": "en", "model": "tiny:marian"}
    assert trace["proposed"] == {"en": english, "zh": ""}
    [attempt] = trace["attempts"]
    assert attempt["reviewed"] == {"en": english, "zh": translated}
    reflect_text = sent(server)[1]["messages"][0]["content"][1]["text"]  # the judge read the translation
    assert reflect_text == render("reflect", "en", task="style_change", instruction_en=english,
                                  instruction_zh=translated).text
    # The judge kept it and lingua, reading the random model's output on its own, finds it mostly Chinese
    # characters: it passes (the next test's English side, the same kind of output, does not).
    assert attempt["languages"] == {"en": "en", "zh": "zh"} and reason == "passed" == trace["verdict"]
    assert trace["translate"]["en_zh"]["revision"] == "random-weights"
    json.dumps(trace)  # the stage stores it as JSON


def test_a_rewrite_in_one_language_has_the_other_translated(server):
    chinese = "把整条街道变成边缘柔和的水彩画。"
    server.replies = [chat(PROPOSAL), chat(reflection("rewrite", "", chinese, "Softer edges, in Chinese only.")),
                      chat(keep("style_change"))]
    reason, trace = outcome(make(server, attempts=2), "style_change", server)
    first, second = trace["attempts"]
    assert first["outcome"] == "rewritten" and first["translated"] == {"from": "zh", "model": "tiny:marian"}
    assert second["reviewed"] == {"en": Translator(TINY).translate([chinese], "zh")[0], "zh": chinese}
    assert "translated" not in trace  # the proposal wrote both
    # The judge kept it, but lingua finds the translated English side Chinese: the language check still applies.
    assert second["languages"] == {"en": "zh", "zh": "zh"} and second["outcome"] == "wrong_language"
    assert reason == "instruction_wrong_language" == trace["verdict"]
