"""The VLM instructor: one proposal call per image, self-reflection per picked instruction, lingua language checks,
and every failure a ledger reason with its trace. The logic runs on the OpenAI-compatible backend against a real
HTTP server on 127.0.0.1 (tests/http_fixture.py) that answers with recorded, realistic model replies; a smoke test
on the tiny random-weight Qwen2.5-VL shows its unusable reply ends as a clean reason, not a crash."""
from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from tests.http_fixture import ApiServer, Reply
from workers.api_editor import ApiEditor
from workers.classical_editor import ClassicalEditor
from workers.sample_images import generate_scene
from workers.vlm import OpenAiVlmConfig, TransformersVlmConfig
from workers.vlm_instructor import InstructionRejected, VlmInstructConfig, VlmInstructor, language_of
from workers.vlm_prompts import render

KEY_ENV = "X2EDIT_TEST_VLM_API_KEY"
TASKS = ("color_change", "portrait_retouch", "text_change", "style_change")
SCENE = np.ascontiguousarray(generate_scene(4)[0][::2, ::2])  # 256 x 320: a street scene, quick to send

# What Qwen2.5-VL-72B answers for a street scene (recorded): two tasks fit, two do not.
PROPOSAL = {
    "color_change": {"en": "Make the red car parked on the left dark blue.", "zh": "把停在左边的红色汽车改成深蓝色。"},
    "portrait_retouch": {"en": "", "zh": ""},
    "text_change": {"en": 'Change the word "OPEN" on the shop sign to "CLOSED FOR THE HOLIDAYS".',
                    "zh": "把店铺招牌上的“OPEN”改成“CLOSED FOR THE HOLIDAYS”。"},
    "style_change": {"en": "Turn the whole street into a watercolour painting with soft edges.",
                     "zh": "把整条街道变成边缘柔和的水彩画。"},
}


def reflection(verdict: str, en: str, zh: str, critique: str, **failed: bool) -> dict:
    return {"critique": critique, "grounded": True, "feasible": True, "matches_task": True, "changes_image": True,
            "languages_ok": True, **failed, "verdict": verdict, "instruction_en": en, "instruction_zh": zh}


def keep(task: str, proposal: dict = PROPOSAL) -> dict:
    return reflection("keep", proposal[task]["en"], proposal[task]["zh"], "The instruction is grounded and fine.")


REJECT = reflection("reject", "", "", "There is no car on the left; the left side is an empty pavement.",
                    grounded=False)


def chat(content: dict | str) -> Reply:
    text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
    return Reply(body={"id": "chatcmpl-1", "object": "chat.completion", "model": "qwen2.5-vl-72b",
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": text}}],
                       "usage": {"prompt_tokens": 1400, "completion_tokens": 90, "total_tokens": 1490}})


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test-instructor")
    with ApiServer() as api:
        yield api


def make(server: ApiServer, attempts: int = 3, language: str = "en") -> VlmInstructor:
    worker = OpenAiVlmConfig(base_url=f"{server.url}/v1", api_key_env=KEY_ENV, model="qwen2.5-vl-72b",
                             timeout_s=5.0, max_retries=0)
    cfg = VlmInstructConfig(worker=worker, reflection_attempts=attempts, prompt_language=language)
    return VlmInstructor(0.02, 0.35, cfg, TASKS)


def follower(server: ApiServer) -> ApiEditor:
    """An editor that follows instructions; building it calls nothing."""
    return ApiEditor(ApiEditor.Config(base_url=f"{server.url}/v1", api_key_env=KEY_ENV, model="gpt-image-1",
                                      tasks=TASKS))


def ask(instructor: VlmInstructor, task: str, editor, seed: int = 0):
    return instructor.propose(task, editor, SCENE, instructor.analyze(SCENE), np.random.default_rng(seed))


def sent(server: ApiServer) -> list[dict]:
    return [json.loads(post.body) for post in server.posts()]


def test_one_proposal_per_image_a_kept_instruction_and_its_provenance(server):
    server.replies = [chat(PROPOSAL), chat(keep("color_change"))]
    instructor, editor = make(server), follower(server)
    instructor.analyze(SCENE)
    assert server.posts() == []  # the call waits for an editor that follows instructions
    assert ask(instructor, "portrait_retouch", editor) is None  # unsuitable: the stage passes to its next task
    p = ask(instructor, "color_change", editor)
    assert (p.task, p.op) == ("color_change", "color_change.vlm")
    assert (p.instruction_en, p.instruction_zh) == (PROPOSAL["color_change"]["en"], PROPOSAL["color_change"]["zh"])
    assert ask(instructor, "color_change", follower(server)) == p  # another editor: no new call
    propose_body, reflect_body = sent(server)

    proposal_prompt = render("propose", "en", tasks=TASKS)
    assert propose_body["messages"][0]["content"][1]["text"] == proposal_prompt.text
    assert sorted(propose_body["response_format"]["json_schema"]["schema"]["properties"]) == sorted(TASKS)
    reflect_prompt = render("reflect", "en", task="color_change", **{
        f"instruction_{lang}": PROPOSAL["color_change"][lang] for lang in ("en", "zh")})
    assert reflect_body["messages"][0]["content"][1]["text"] == reflect_prompt.text

    trace = p.params["instruct"]
    assert trace["propose"] == {"template": "propose/en@vlm-propose-1", "sha256": proposal_prompt.sha256,
                                "seed": propose_body["seed"]}
    assert trace["reflect"] == {"template": "reflect/en@vlm-reflect-1", "sha256": reflect_prompt.sha256}
    assert trace["proposed"] == PROPOSAL["color_change"] and trace["verdict"] == "passed"
    [attempt] = trace["attempts"]
    assert attempt["seed"] == reflect_body["seed"] and attempt["outcome"] == "passed"
    assert attempt["reply"]["critique"] == "The instruction is grounded and fine."
    assert attempt["languages"] == {"en": "en", "zh": "zh"}
    assert trace["vlm"]["model"] == "qwen2.5-vl-72b" and trace["language_id"].startswith("lingua-language-detector")
    json.dumps(p.params)  # the stage stores it as JSON


def test_a_rewrite_is_judged_again_and_then_kept(server):
    rewritten = {"en": "Make the red car parked on the right dark blue.", "zh": "把停在右边的红色汽车改成深蓝色。"}
    fix = reflection("rewrite", rewritten["en"], rewritten["zh"],
                     "The red car is parked on the right, not the left.", grounded=False)
    server.replies = [chat(PROPOSAL), chat(fix),
                      chat(reflection("keep", rewritten["en"], rewritten["zh"], "Fine now."))]
    p = ask(make(server, language="zh"), "color_change", follower(server))
    assert (p.instruction_en, p.instruction_zh) == (rewritten["en"], rewritten["zh"])
    attempts = p.params["instruct"]["attempts"]
    assert [a["outcome"] for a in attempts] == ["rewritten", "passed"]
    assert attempts[0]["reply"]["critique"] == fix["critique"] and attempts[1]["reviewed"] == rewritten
    second = sent(server)[2]["messages"][0]["content"][1]["text"]
    assert second == render("reflect", "zh", task="color_change", instruction_en=rewritten["en"],
                            instruction_zh=rewritten["zh"]).text
    assert p.params["instruct"]["reflect"]["template"] == "reflect/zh@vlm-reflect-1"


@pytest.mark.parametrize("failing", [
    REJECT,
    reflection("keep", PROPOSAL["color_change"]["en"], PROPOSAL["color_change"]["zh"],
               "The car is already dark blue.", changes_image=False),  # a keep that fails its own check
    reflection("rewrite", "Make the car on the right dark blue.", "", "Wrong side."),  # a rewrite half empty
])
def test_an_instruction_that_never_passes_is_reflection_failed(server, failing):
    server.replies = [chat(PROPOSAL), chat(failing)]  # the last reply repeats
    instructor, editor = make(server, attempts=3), follower(server)
    with pytest.raises(InstructionRejected) as caught:
        ask(instructor, "color_change", editor)
    assert caught.value.reason == "reflection_failed" and failing["critique"] in caught.value.message
    trace = caught.value.provenance
    assert trace["verdict"] == "reflection_failed" and len(trace["attempts"]) == 3 == len(server.posts()) - 1
    assert {a["outcome"] for a in trace["attempts"]} == {"rejected"}
    assert all(a["reply"]["critique"] == failing["critique"] for a in trace["attempts"])
    assert all(a["reviewed"] == PROPOSAL["color_change"] for a in trace["attempts"])
    with pytest.raises(InstructionRejected, match="reflection_failed"):
        ask(instructor, "color_change", follower(server))  # asked again for another editor: the same verdict
    assert len(server.posts()) == 4


ENGLISH_TWICE = {**PROPOSAL, "style_change": {"en": PROPOSAL["style_change"]["en"],
                                              "zh": "Turn the street into a watercolour painting."}}


def test_a_wrong_language_side_the_judge_keeps_ends_with_its_reason(server):
    weak_keep = keep("style_change", ENGLISH_TWICE)  # the judge misses it; lingua does not
    server.replies = [chat(ENGLISH_TWICE), chat(weak_keep)]
    with pytest.raises(InstructionRejected) as caught:
        ask(make(server, attempts=2), "style_change", follower(server))
    assert caught.value.reason == "instruction_wrong_language"
    assert [a["languages"] for a in caught.value.provenance["attempts"]] == [{"en": "en", "zh": "en"}] * 2
    assert "wrong_language" in caught.value.message


def test_a_wrong_language_side_the_judge_rewrites_passes(server):
    server.replies = [chat(ENGLISH_TWICE), chat(reflection(
        "rewrite", PROPOSAL["style_change"]["en"], PROPOSAL["style_change"]["zh"],
        "The Chinese version is written in English.", languages_ok=False)), chat(keep("style_change"))]
    p = ask(make(server), "style_change", follower(server))
    assert p.instruction_zh == PROPOSAL["style_change"]["zh"]
    assert [a["languages"]["zh"] for a in p.params["instruct"]["attempts"]] == ["en", "zh"]


def test_quoted_text_to_appear_in_the_picture_does_not_decide_the_language(server):
    server.replies = [chat(PROPOSAL), chat(keep("text_change"))]
    p = ask(make(server), "text_change", follower(server))
    assert p.params["instruct"]["attempts"][0]["languages"] == {"en": "en", "zh": "zh"}


@pytest.mark.parametrize("text, language", [
    ("Make the yellow taxi dark green.", "en"), ("把黄色出租车改成深绿色。", "zh"),
    ("把招牌上的 \"OPEN SUNDAY TO FRIDAY\" 改成 \"CLOSED\"", "zh"),  # English unless the quotes are set aside
    ("Change the sign to “营业中”.", "en"), ("車を青くしてください。", None), ("“OPEN”", None),
])
def test_language_of(text, language):
    assert language_of(text) == language


def test_an_unparseable_proposal_ends_each_instruction_and_spares_the_classical_editor(server):
    server.replies = [chat("Sure! Here are some edits for this street: 1. Make the car blue. 2. ...")]
    instructor = make(server)
    for task in ("color_change", "style_change"):
        with pytest.raises(InstructionRejected) as caught:
            ask(instructor, task, follower(server))
        assert caught.value.reason == "vlm_unparseable" and caught.value.message.startswith("the proposal: not JSON")
        assert caught.value.provenance["verdict"] == "vlm_unparseable" and "attempts" not in caught.value.provenance
    assert len(server.posts()) == 1  # one proposal per image, failed or not
    classical = ask(instructor, "style_change", ClassicalEditor())
    assert classical is not None and classical.op.startswith("style.") and len(server.posts()) == 1


def test_an_unparseable_reflection_is_one_failed_attempt(server):
    server.replies = [chat(PROPOSAL), chat('{"critique": "Fine.", "verdict": "keep"'), chat(keep("style_change"))]
    p = ask(make(server), "style_change", follower(server))
    assert [a["outcome"] for a in p.params["instruct"]["attempts"]] == ["vlm_unparseable", "passed"]


def test_a_last_reflection_unparseable_is_the_reason(server):
    server.replies = [chat(PROPOSAL), chat("The instruction looks good to me.")]
    with pytest.raises(InstructionRejected) as caught:
        ask(make(server, attempts=1), "style_change", follower(server))
    assert caught.value.reason == "vlm_unparseable" and "the last vlm_unparseable: not JSON" in caught.value.message
    assert caught.value.provenance["attempts"][0]["message"].startswith("not JSON")


def test_a_proposal_in_one_language_only_is_rejected(server):
    server.replies = [chat({**PROPOSAL, "style_change": {"en": PROPOSAL["style_change"]["en"], "zh": ""}})]
    with pytest.raises(InstructionRejected) as caught:
        ask(make(server), "style_change", follower(server))
    assert caught.value.reason == "instruction_missing_language" and "['en']" in caught.value.message
    assert len(server.posts()) == 1  # nothing to reflect on


def test_the_recipe_block():
    cfg = VlmInstructConfig.model_validate({"worker": {"backend": "transformers", "model": "tiny:qwen2.5-vl"},
                                            "reflection_attempts": 2})
    assert isinstance(cfg.worker, TransformersVlmConfig) and cfg.prompt_language == "en"
    with pytest.raises(ValidationError, match="reflection_attempt"):
        VlmInstructConfig.model_validate({"worker": {"backend": "transformers", "model": "m"},
                                          "reflection_attempt": 2})
    with pytest.raises(ValidationError, match="reflection_attempts"):
        VlmInstructConfig.model_validate({"worker": {"backend": "transformers", "model": "m"},
                                          "reflection_attempts": 0})


def test_tiny_qwen25vl_proposal_ends_as_a_reason_not_a_crash(tmp_path, monkeypatch, server):
    """Random weights never close the proposal's strings: the grammar keeps the shape, the limit ends it."""
    pytest.importorskip("xgrammar")
    from workers.tiny_models import TINY_MODELS_ENV

    monkeypatch.setenv(TINY_MODELS_ENV, str(tmp_path))
    cfg = VlmInstructConfig(worker=TransformersVlmConfig(model="tiny:qwen2.5-vl", dtype="float32"),
                            propose_max_new_tokens=24)
    instructor = VlmInstructor(0.02, 0.35, cfg, TASKS)
    with pytest.raises(InstructionRejected) as caught:
        ask(instructor, "color_change", follower(server))
    assert caught.value.reason == "vlm_truncated"
    assert caught.value.provenance["vlm"]["revision"] == "random-weights"
    assert caught.value.provenance["propose"]["template"] == "propose/en@vlm-propose-1"


def test_in_the_instruct_stage_a_failed_instruction_ends_alone_with_its_trace(server):
    """The stage: the VLM's pairs and a classical one from one sample; the instruction that never passes its
    reflection is its own rejected unit (counted in the fan-out), the others go on."""
    from manifests.schema import LIVE, REJECTED
    from stages.base import StageContext
    from stages.edit import EditConfig
    from stages.instruct import InstructConfig, InstructStage, preference
    from tests.corpus import source_row

    worker = {"backend": "openai", "base_url": f"{server.url}/v1", "api_key_env": KEY_ENV, "model": "qwen",
              "timeout_s": 5.0, "max_retries": 0}
    instruct = InstructConfig(backend="vlm", vlm={"worker": worker, "reflection_attempts": 2}, tasks_per_source=3,
                              target_mix={"style_change": 1, "color_change": 1, "camera_movement": 1})
    edit = EditConfig(editors={"classical": {"backend": "classical"},
                               "gpt": {"backend": "api", "base_url": f"{server.url}/v1", "model": "gpt-image-1",
                                       "api_key_env": KEY_ENV, "tasks": ["style_change", "color_change"]}},
                      route={"style_change": {"gpt": 1}, "color_change": {"gpt": 1}, "camera_movement": {"classical": 1}})
    stage = InstructStage((instruct, edit), StageContext(seed=0, recipe_hash="h", run_dir="."))
    reflections = {"style_change": [chat(keep("style_change"))], "color_change": [chat(REJECT), chat(REJECT)],
                   "camera_movement": []}  # in the order the stage asks (the sample's task preference)
    asked = {t: PROPOSAL[t] for t in ("color_change", "style_change")}  # the proposal covers the routed tasks only
    server.replies = [chat(asked)] + [r for t in preference(stage.sequence, 0, 3) for r in reflections[t]]
    rows = {r["task"]: r for r in stage.process_row(source_row(SCENE, 0))}
    assert set(rows) == {"style_change", "color_change", "camera_movement"}
    assert all(r["fanout"] == 3 and r["unit_id"] == r["pair_id"] for r in rows.values())
    assert rows["style_change"]["status"] == LIVE and rows["camera_movement"]["status"] == LIVE
    assert rows["style_change"]["instruction_en"] == PROPOSAL["style_change"]["en"]
    failed = rows["color_change"]
    assert (failed["status"], failed["stage"], failed["reason"]) == (REJECTED, "instruct", "reflection_failed")
    trace = json.loads(failed["provenance"])["instruct"]
    assert trace["worker"] == "vlm" and len(trace["attempts"]) == 2 and trace["verdict"] == "reflection_failed"
