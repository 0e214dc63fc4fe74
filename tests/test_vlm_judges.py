"""VLM judges as scorers: ImgEdit-Judge and VIEScore on recorded, realistic replies served by a real HTTP server
on 127.0.0.1 (tests/http_fixture.py), the score stage with a judge end to end (no Ray), and a smoke run on the
tiny random-weight Qwen2.5-VL (`tiny:qwen2.5-vl`)."""
from __future__ import annotations

import base64
import io
import json
import math

import cv2
import numpy as np
import pytest
from PIL import Image

from filters.vlm_judges import EditPair, ImgEditJudge, ImgEditJudgeConfig, Scored, VieScore, VieScoreConfig
from manifests.images import encode_jpeg, encode_mask
from manifests.schema import FAILED, LIVE, REJECTED, empty_row
from pipeline.recipe import RecipeError, parse_recipe
from stages.base import StageContext, to_table
from stages.score import ScoreConfig, ScoreStage
from tests.http_fixture import ApiServer, Reply
from workers.sample_images import generate_scene

KEY_ENV = "X2EDIT_TEST_JUDGE_API_KEY"
VLM_REASONS = {"vlm_unparseable", "vlm_schema_mismatch", "vlm_truncated"}

# Replies as the judges write them (the fine-tuned checkpoint's four lines; Qwen2.5-VL's fenced JSON).
TEXT_GOOD = ("Brief reasoning: The mug is gone and the wood grain continues where it stood.\n"
             "Score 1: 4\nScore 2: 5\nObjects match: True")
TEXT_LOW = ("Brief reasoning: The mug is fainter but its outline and shadow remain.\n"
            "Score 1: 2\nScore 2: 3 (a smeared patch)\nObjects match: False")
JSON_GOOD = ('{"reasoning": "The car is blue; its reflections and the street are kept.", '
             '"instruction_following": 5, "naturalness": 4, "objects_match": false}')
MALFORMED = "The mug has been removed successfully. I would rate instruction following 4/5 and naturalness 5/5."
TEXT_OUT_OF_RANGE = "Brief reasoning: A perfect removal.\nScore 1: 6\nScore 2: 5\nObjects match: True"
JSON_OUT_OF_RANGE = '{"reasoning": "Perfect.", "instruction_following": 7, "naturalness": 5, "objects_match": true}'
VIE_SC = ('```json\n{"reasoning": "The car is blue now, but the hedge behind it turned blue as well.", '
          '"editing_success": 8, "over_editing": 6}\n```')
VIE_PQ = '{"reasoning": "Believable light and shadows; the wheels are smeared.", "naturalness": 9, "artifacts": 4}'


def chat(content: str, finish: str = "stop") -> Reply:
    return Reply(body={"object": "chat.completion", "model": "judge",
                       "choices": [{"index": 0, "finish_reason": finish,
                                    "message": {"role": "assistant", "content": content}}],
                       "usage": {"prompt_tokens": 1500, "completion_tokens": 42}})


def scene(index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A small generated scene, the same with its object inverted (a visible edit), and the object's mask."""
    image, mask = generate_scene(index)
    image = cv2.resize(image, (96, 64), interpolation=cv2.INTER_AREA)
    mask = cv2.resize(mask.astype(np.uint8), (96, 64), interpolation=cv2.INTER_NEAREST) > 0
    edited = image.copy()
    edited[mask] = 255 - edited[mask]
    return image, edited, mask


def pair(index: int = 0) -> EditPair:
    src, edited, _ = scene(index)
    return EditPair(src, edited, "Remove the mug from the table", "把桌上的杯子删掉")


def row(index: int, task: str, instruction: str | None = "Remove the mug from the table") -> dict:
    src, edited, mask = scene(index)
    return {**empty_row(), "unit_id": f"u{index}", "sample_id": f"s{index}", "pair_id": f"p{index}",
            "status": LIVE, "task": task, "src": encode_jpeg(src), "edited": encode_jpeg(edited),
            "mask": encode_mask(mask), "instruction_en": instruction, "instruction_zh": "把桌上的杯子删掉",
            "scores": "{}", "provenance": json.dumps({"edit": {"worker": "test"}})}


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test-judge")
    with ApiServer() as api:
        yield api


def endpoint(server: ApiServer) -> dict:
    """An OpenAI-compatible VLM block; one request at a time, so the scripted replies meet requests in order."""
    return {"backend": "openai", "base_url": f"{server.url}/v1", "api_key_env": KEY_ENV, "model": "imgedit-judge",
            "concurrency": 1, "timeout_s": 5.0, "max_retries": 0}


def sent(server: ApiServer) -> list[dict]:
    return [json.loads(seen.body) for seen in server.posts()]


def png_images(request: dict) -> list[np.ndarray]:
    urls = [c["image_url"]["url"] for c in request["messages"][0]["content"] if c["type"] == "image_url"]
    return [np.array(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))) for url in urls]


# --- ImgEdit-Judge ------------------------------------------------------------------------------------------------

def test_imgedit_judge_reads_the_checkpoints_four_lines(server):
    server.replies = [chat(TEXT_GOOD), chat(TEXT_LOW)]
    judge = ImgEditJudge(ImgEditJudgeConfig(vlm=endpoint(server), language="zh"))
    good, low = judge.score([pair(0), pair(1)])
    assert good == Scored({"judge_instruction": 4.0, "judge_naturalness": 5.0, "judge_sum": 9.0,
                           "judge_objects_match": 1.0}, {})
    assert low.scores["judge_sum"] == 5.0 and low.scores["judge_objects_match"] == 0.0 and not low.missing
    first = sent(server)[0]
    assert "response_format" not in first  # the checkpoint answers in lines, free
    assert "把桌上的杯子删掉" in first["messages"][0]["content"][-1]["text"]
    source, edited = png_images(first)
    assert np.array_equal(source, pair(0).source) and np.array_equal(edited, pair(0).edited)
    provenance = judge.provenance()
    assert provenance["model"] == "imgedit-judge" and provenance["scorer"] == "imgedit_judge"
    assert [t.split("@")[0] for t in provenance["templates"]] == ["judge_imgedit_text/zh"]


def test_imgedit_judge_json_variant_asks_for_the_schema(server):
    server.replies = [chat(JSON_GOOD)]
    [scored] = ImgEditJudge(ImgEditJudgeConfig(vlm=endpoint(server), reply="json")).score([pair()])
    assert scored.scores == {"judge_instruction": 5.0, "judge_naturalness": 4.0, "judge_sum": 9.0,
                             "judge_objects_match": 0.0}
    assert sent(server)[0]["response_format"]["json_schema"]["name"] == "judge_imgedit_json"


@pytest.mark.parametrize("reply, content, finish, reason, detail", [
    ("text", MALFORMED, "stop", "vlm_unparseable", "no line for reasoning"),
    ("text", TEXT_OUT_OF_RANGE, "stop", "vlm_unparseable", "no line for instruction_following"),
    ("json", JSON_OUT_OF_RANGE, "stop", "vlm_schema_mismatch", "7 is greater than the maximum of 5"),
    ("json", '{"reasoning": "The mug is gone but a faint ring', "length", "vlm_truncated", "token limit"),
])
def test_an_unreadable_judgement_leaves_every_score_absent_with_its_reason(server, reply, content, finish, reason,
                                                                          detail):
    server.replies = [chat(content, finish)]
    [scored] = ImgEditJudge(ImgEditJudgeConfig(vlm=endpoint(server), reply=reply)).score([pair()])
    assert scored.scores == {} and set(scored.missing) == set(ImgEditJudge.names)
    assert {(why.reason, detail in why.message) for why in scored.missing.values()} == {(reason, True)}


# --- VIEScore -----------------------------------------------------------------------------------------------------

def test_viescore_takes_the_min_of_each_pair_and_their_geometric_mean(server):
    server.replies = [chat(VIE_SC), chat(VIE_PQ)]
    judge = VieScore(VieScoreConfig(vlm=endpoint(server)))
    [scored] = judge.score([pair()])
    assert scored.missing == {}
    assert scored.scores == {"viescore_editing_success": 8.0, "viescore_over_editing": 6.0, "viescore_sc": 6.0,
                             "viescore_sc_sum": 14.0, "viescore_naturalness": 9.0, "viescore_artifacts": 4.0,
                             "viescore_pq": 4.0, "viescore_o": math.sqrt(6.0 * 4.0)}
    sc, pq = sent(server)
    assert sc["response_format"]["json_schema"]["name"] == "viescore_sc"
    assert "Remove the mug from the table" in sc["messages"][0]["content"][-1]["text"]
    [edited] = png_images(pq)  # PQ judges the edited image alone (§5)
    assert pq["response_format"]["json_schema"]["name"] == "viescore_pq" and np.array_equal(edited, pair().edited)


def test_viescore_keeps_the_half_it_could_read(server):
    server.replies = [chat(VIE_SC), chat('{"reasoning": "The scene looks natural but the', "length")]
    [scored] = VieScore(VieScoreConfig(vlm=endpoint(server))).score([pair()])
    assert scored.scores["viescore_sc"] == 6.0 and "viescore_pq" not in scored.scores
    assert sorted(scored.missing) == ["viescore_artifacts", "viescore_naturalness", "viescore_o", "viescore_pq"]
    assert {why.reason for why in scored.missing.values()} == {"vlm_truncated"}


# --- the score stage ----------------------------------------------------------------------------------------------

def stage(server: ApiServer, **score) -> ScoreStage:
    cfg = ScoreConfig.model_validate({"scorers": {"judge": {"backend": "imgedit_judge", "vlm": endpoint(server)}},
                                      **score})
    return ScoreStage(cfg, StageContext(seed=0, recipe_hash="h", run_dir="."))


POLICY = {"rules": [{"score": "change_global", "min": 0.001, "reason": "no_op_edit"},
                    {"score": "judge_sum", "min": 4, "reason": "judge_low_score"}],             # §1.8
          "per_task": {"subject_removal": [{"score": "judge_sum", "min": 9, "reason": "judge_low_score"}]}}  # §3.8


def test_the_score_stage_judges_its_live_rows_in_one_batch_and_the_policy_decides(server):
    server.replies = [chat(TEXT_GOOD), chat(TEXT_LOW), chat(TEXT_LOW), chat(MALFORMED)]
    broken = {**row(4, "style_change"), "mask": b"\x89PNG\r\n\x1a\n not really"}
    rows = [row(0, "subject_removal"), row(1, "subject_removal"), row(2, "style_change"), row(3, "style_change"),
            broken]
    out = {r["unit_id"]: r for r in stage(server, **POLICY)(to_table(rows)).to_pylist()}
    assert len(server.posts()) == 4  # the broken row ended before the judge was asked
    kept, low, weak_but_kept, unjudged = out["u0"], out["u1"], out["u2"], out["u3"]
    assert kept["status"] == LIVE and json.loads(kept["scores"])["judge_sum"] == 9.0
    assert {"score": "judge_sum", "min": 9.0, "reason": "judge_low_score"} in json.loads(kept["thresholds"])
    judged_by = json.loads(kept["provenance"])["score"]["judge"]
    assert judged_by["model"] == "imgedit-judge" and json.loads(kept["provenance"])["edit"] == {"worker": "test"}
    assert (low["status"], low["reason"]) == (REJECTED, "judge_low_score")  # 5 < 9 for a removal
    assert low["message"] == "judge_sum=5.0000 outside min=9.0"
    assert weak_but_kept["status"] == LIVE  # 5 >= 4 for a Kontext-style task
    # The judge could not read its reply: no score invented, the judge's reason in the ledger, heuristics kept.
    assert (unjudged["status"], unjudged["reason"]) == (REJECTED, "vlm_unparseable")
    assert unjudged["message"].startswith("judge could not give judge_sum: no line for reasoning: 'The mug")
    scores = json.loads(unjudged["scores"])
    assert "change_global" in scores and not any(name.startswith("judge_") for name in scores)
    assert unjudged["warnings"][0].startswith("vlm_unparseable: judge: no line for")
    assert (out["u4"]["status"], out["u4"]["reason"]) == (FAILED, "UnidentifiedImageError")


def test_without_a_rule_on_it_an_unjudged_pair_is_kept_and_says_why(server):
    server.replies = [chat(MALFORMED)]
    [kept] = stage(server, rules=[{"score": "change_global", "min": 0.001, "reason": "no_op_edit"}]).process(
        [row(0, "style_change")])
    assert kept["status"] == LIVE and "judge_sum" not in json.loads(kept["scores"])
    assert [w.split(": ")[:2] for w in kept["warnings"]] == [["vlm_unparseable", "judge"]]


def test_a_pair_the_judge_cannot_be_asked_about_fails_alone(server):
    server.replies = [chat(TEXT_GOOD)]
    out = stage(server, **POLICY).process([row(0, "subject_removal"), row(1, "style_change", instruction=None)])
    judged, failed = sorted(out, key=lambda r: r["unit_id"])
    assert judged["status"] == LIVE and json.loads(judged["scores"])["judge_sum"] == 9.0
    assert (failed["status"], failed["reason"]) == (FAILED, "PromptError") and "instruction" in failed["message"]
    assert "change_global" in json.loads(failed["scores"])  # what was measured stays in the ledger
    assert len(server.posts()) == 1


def test_a_judge_service_that_refuses_fails_each_row_with_its_error(server):
    server.replies = [Reply(401, {"error": {"message": "invalid api key"}})]
    out = stage(server, **POLICY).process([row(0, "subject_removal"), row(1, "style_change")])
    assert [(r["status"], r["reason"]) for r in out] == [(FAILED, "ApiError")] * 2
    assert all("HTTP 401" in r["message"] and r["src"] is None for r in out)


def test_scorer_blocks_are_validated_with_the_recipe():
    judge = {"backend": "imgedit_judge", "vlm": {"backend": "transformers", "model": "/models/ImgEdit_Judge"}}
    recipe = parse_recipe({"name": "x", "score": {"scorers": {"judge": judge}}})
    assert isinstance(recipe.score.scorers["judge"], ImgEditJudgeConfig)
    with pytest.raises(RecipeError, match="scorers 'judge' and 'again' both use backend 'imgedit_judge'"):
        parse_recipe({"name": "x", "score": {"scorers": {"judge": judge, "again": judge}}}, "r.yaml")
    with pytest.raises(RecipeError, match=r"score\.scorers\.judge\.imgedit_judge\.replies: Extra inputs"):
        parse_recipe({"name": "x", "score": {"scorers": {"judge": {**judge, "replies": "text"}}}}, "r.yaml")
    with pytest.raises(RecipeError, match="does not match any of the expected tags"):
        parse_recipe({"name": "x", "score": {"scorers": {"judge": {**judge, "backend": "no_such_scorer"}}}}, "r.yaml")


# --- the tiny random-weight Qwen2.5-VL ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("xgrammar")
    from workers.tiny_models import TINY_MODELS_ENV

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(TINY_MODELS_ENV, str(tmp_path_factory.mktemp("tiny-models")))
        yield {"backend": "transformers", "model": "tiny:qwen2.5-vl", "dtype": "float32", "batch_size": 4}


def test_tiny_qwen25vl_judges_end_in_scores_or_recorded_reasons(tiny_vlm):
    """Random weights rarely close a judgement: whatever comes, a score in range or a reason, nothing crashes."""
    cfg = ScoreConfig.model_validate({"scorers": {
        "judge": {"backend": "imgedit_judge", "max_new_tokens": 24, "vlm": tiny_vlm},  # free text, the lines
        "viescore": {"backend": "viescore", "max_new_tokens": 32, "vlm": tiny_vlm}}})  # JSON under xgrammar
    score_stage = ScoreStage(cfg, StageContext(seed=0, recipe_hash="h", run_dir="."))
    out = score_stage.process([row(0, "subject_removal"), row(1, "style_change")])
    bounds = {"judge_instruction": (1, 5), "judge_naturalness": (1, 5), "judge_sum": (2, 10),
              "judge_objects_match": (0, 1), "viescore_o": (0, 10), "viescore_sc_sum": (0, 20)}
    for r in out:
        assert r["status"] == LIVE, (r["reason"], r["message"])
        scores, reasons = json.loads(r["scores"]), {tuple(w.split(": ")[:2]) for w in r["warnings"] or []}
        for name, scorer in score_stage.scorers.items():
            unscored = {why for why, by in reasons if by == name}
            assert unscored <= VLM_REASONS
            for score in scorer.names:
                low, high = bounds.get(score, (0, 10))
                assert (low <= scores[score] <= high) if score in scores else unscored, (score, reasons)
        print(f"\ntiny judges on {r['unit_id']}: {sorted(reasons) or 'all scored'}")
    [direct] = ImgEditJudge(ImgEditJudgeConfig(vlm=tiny_vlm, reply="json", max_new_tokens=32)).score([pair(2)])
    assert set(direct.scores) | set(direct.missing) == set(ImgEditJudge.names)
    assert all(why.reason in VLM_REASONS for why in direct.missing.values())
