"""The VLM prompt data files: every template renders in both languages, the task list is the taxonomy's,
every schema accepts a realistic reply and rejects broken ones, hashes identify exactly the text used."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jsonschema
import pytest
import yaml

from manifests.taxonomy import TASKS
from workers.vlm_prompts import DEFAULT_FOLDER, NAMED_TASKS, PromptError, PromptLibrary, library, render

LIB = library()
SLOTS = {  # realistic values for every caller slot any template takes
    "task": "camera_movement",
    "instruction_en": "Show the kitchen from directly above, as a top-down view.",
    "instruction_zh": "从正上方俯视这个厨房。",
    "instruction": "Replace the cat on the sofa with a golden retriever.",
    "question": "Is there a person in the picture?",
    "prompt": "一只戴着红围巾的柴犬坐在雪地里",
    "text": "CLOSED",
}
CJK = re.compile(r"[\u4e00-\u9fff]")


def slots_for(name: str) -> dict[str, str]:
    return {k: SLOTS[k] for k in LIB.slots(name)}


@pytest.mark.parametrize("language", ["en", "zh"])
@pytest.mark.parametrize("name", sorted(LIB.templates))
def test_every_template_renders_in_both_languages(name, language):
    slots = slots_for(name)
    p = render(name, language, **slots)
    assert not re.search(r"\{[a-z_]+\}", p.text), "a placeholder was left unfilled"
    assert all(v in p.text for v in slots.values())
    assert bool(CJK.search(LIB.templates[name].text[language])) == (language == "zh")  # before the slots
    assert p.template_id.startswith(f"{name}/{language}@vlm-") and re.fullmatch(r"[0-9a-f]{64}", p.sha256)
    assert (p.schema is None) != (p.lines is None)


def test_the_task_list_is_the_taxonomys():
    assert NAMED_TASKS == tuple(t.name for t in TASKS if t.name != "other") and len(NAMED_TASKS) == 15
    assert tuple(LIB.tasks) == NAMED_TASKS
    for language in ("en", "zh"):
        p = render("propose", language)
        assert tuple(p.schema["properties"]) == NAMED_TASKS == tuple(p.schema["required"])
        assert [n for n in NAMED_TASKS if f"- {n}" in p.text] == list(NAMED_TASKS)
        assert all(e[language] in p.text for task in LIB.tasks.values() for e in task.examples)


def test_the_proposal_can_be_narrowed_to_the_tasks_an_editor_covers():
    p = render("propose", "en", tasks=["text_change", "camera_movement"])
    assert list(p.schema["properties"]) == ["text_change", "camera_movement"] == p.schema["required"]
    assert "- camera_movement" in p.text and "- style_change" not in p.text
    assert p.sha256 != render("propose", "en").sha256
    with pytest.raises(PromptError, match="camera_move"):
        render("propose", "en", tasks=["camera_move"])
    with pytest.raises(PromptError, match="no task list"):
        render("judge_imgedit_json", "en", tasks=["text_change"], instruction="x")


def test_the_reflection_prompt_carries_the_task_definition():
    p = render("reflect", "zh", **slots_for("reflect"))
    assert LIB.tasks["camera_movement"].definition["zh"] in p.text and "相机移动" in p.text
    with pytest.raises(PromptError, match="'other'"):
        render("reflect", "en", **{**slots_for("reflect"), "task": "other"})


# A realistic reply per schema, and how each is broken beyond a missing and an extra key (added in the test).
REPLIES = {
    "propose": {n: {"en": "", "zh": ""} for n in NAMED_TASKS} | {
        "camera_movement": {"en": "Show the kitchen from directly above.", "zh": "从正上方俯视这个厨房。"},
        "tone_transformation": {"en": "Make it dusk with warm light.", "zh": "把场景变成黄昏，光线温暖。"}},
    "reflect": {"critique": "Grounded and feasible; the Chinese matches the English.", "grounded": True,
                "feasible": True, "matches_task": True, "changes_image": True, "languages_ok": True,
                "verdict": "keep", "instruction_en": SLOTS["instruction_en"],
                "instruction_zh": SLOTS["instruction_zh"]},
    "judge_imgedit_json": {"reasoning": "Cat replaced by a dog; sofa and light unchanged.",
                           "instruction_following": 5, "naturalness": 4, "objects_match": True},
    "viescore_sc": {"reasoning": "The dog replaces the cat; the room is untouched.", "editing_success": 9,
                    "over_editing": 8},
    "viescore_pq": {"reasoning": "Plausible lighting; the dog's paw is slightly smeared.", "naturalness": 8,
                    "artifacts": 6},
    "ask_yes_no": {"answer": "yes"},
}
BROKEN = {
    "propose": [("wrong type", "camera_movement", "Show the kitchen from above."),
                ("extra key inside", "low_level", {"en": "", "zh": "", "de": ""})],
    "reflect": [("wrong type", "grounded", "yes"), ("out of range", "verdict", "maybe")],
    "judge_imgedit_json": [("wrong type", "naturalness", "4"), ("out of range", "instruction_following", 6)],
    "viescore_sc": [("wrong type", "editing_success", 8.5), ("out of range", "over_editing", 11)],
    "viescore_pq": [("wrong type", "reasoning", None), ("out of range", "artifacts", -1)],
    "ask_yes_no": [("wrong type", "answer", True), ("out of range", "answer", "Yes")],
}


def test_every_schema_has_a_realistic_reply_here():
    schemas = {json.dumps(render(n, "en", **slots_for(n)).schema, sort_keys=True)
               for n in LIB.templates if LIB.templates[n].schema}
    covered = {json.dumps(render(n, "en", **slots_for(n)).schema, sort_keys=True) for n in REPLIES}
    assert covered == schemas and len(list((DEFAULT_FOLDER / "schemas").glob("*.json"))) == len(schemas)


@pytest.mark.parametrize("name", sorted(REPLIES))
def test_each_schema_accepts_a_realistic_reply_and_rejects_broken_ones(name):
    schema, reply = render(name, "en", **slots_for(name)).schema, REPLIES[name]
    jsonschema.validate(reply, schema)
    first = next(iter(reply))
    broken = [{k: v for k, v in reply.items() if k != first}, {**reply, "confidence": 0.9}]
    broken += [{**reply, key: value} for _, key, value in BROKEN[name]]
    for bad in broken:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_the_judges_line_reply_parses_into_the_json_variants_record():
    reply = ("Brief reasoning: The cat is now a dog: fur and pose look right.\n"
             "Score 1: 5\nScore 2: 4 (slight halo)\nObjects match: True\n")
    lines = render("judge_imgedit_text", "zh", instruction="把猫换成狗").lines
    raw = {field: re.search(pattern, reply, re.MULTILINE)[1] for field, pattern in lines.items()}
    schema = render("judge_imgedit_json", "en", instruction="x").schema
    convert = {"integer": int, "boolean": lambda v: v == "True", "string": str}
    record = {f: convert[schema["properties"][f]["type"]](v) for f, v in raw.items()}
    assert record == {"reasoning": "The cat is now a dog: fur and pose look right.", "instruction_following": 5,
                      "naturalness": 4, "objects_match": True}
    jsonschema.validate(record, schema)


@pytest.fixture
def copy_folder(tmp_path) -> Path:
    return Path(shutil.copytree(DEFAULT_FOLDER, tmp_path / "vlm"))


def edit_yaml(path: Path, change) -> None:
    data = yaml.safe_load(path.read_text("utf-8"))
    change(data)
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), "utf-8")


def test_hashes_are_stable_and_name_the_template_not_the_sample(copy_folder):
    a = render("reflect", "en", **slots_for("reflect"))
    b = PromptLibrary(copy_folder).render("reflect", "en", **slots_for("reflect"))
    assert (a.sha256, a.template_id, a.text) == (b.sha256, b.template_id, b.text)
    other_instruction = render("reflect", "en", **{**slots_for("reflect"), "instruction_en": "Zoom out."})
    other_task = render("reflect", "en", **{**slots_for("reflect"), "task": "text_change"})
    assert other_instruction.sha256 == a.sha256 != other_task.sha256  # the definition is part of the text
    assert render("reflect", "zh", **slots_for("reflect")).sha256 != a.sha256


def test_hashes_change_with_the_template_the_schema_or_a_task_definition(copy_folder):
    before = {n: render(n, "en", **slots_for(n)).sha256 for n in ("viescore_sc", "viescore_pq", "propose")}
    edit_yaml(copy_folder / "judge_viescore.yaml",
              lambda d: d["templates"]["viescore_sc"].update(en=d["templates"]["viescore_sc"]["en"] + " Be brief."))
    schema = json.loads((copy_folder / "schemas/viescore_pq.json").read_text())
    schema["properties"]["artifacts"]["maximum"] = 5
    (copy_folder / "schemas/viescore_pq.json").write_text(json.dumps(schema))
    edit_yaml(copy_folder / "tasks.yaml", lambda d: d["tasks"]["low_level"]["definition"].update(en="Edges only."))
    lib = PromptLibrary(copy_folder)
    after = {n: lib.render(n, "en", **slots_for(n)).sha256 for n in before}
    assert all(after[n] != before[n] for n in before)
    untouched = lib.render("viescore_sc", "zh", instruction="x")  # only the English text was edited
    assert untouched.sha256 == render("viescore_sc", "zh", instruction="x").sha256


def test_a_missing_or_unknown_slot_is_an_error_naming_the_template():
    with pytest.raises(PromptError, match=r"'reflect'.*missing slot\(s\) \['instruction_zh'\]"):
        render("reflect", "en", task="camera_movement", instruction_en="Zoom out.")
    with pytest.raises(PromptError, match=r"'viescore_sc'.*unknown slot\(s\) \['instrucion'\]"):
        render("viescore_sc", "en", instruction="x", instrucion="x")
    with pytest.raises(PromptError, match=r"'ask_yes_no'.*non-empty"):
        render("ask_yes_no", "en", question="  ")
    with pytest.raises(PromptError, match="filled by the loader"):
        render("reflect", "en", **slots_for("reflect"), task_definition="anything goes")


@pytest.mark.parametrize("file, change, message", [
    ("tasks.yaml", lambda d: d["tasks"].pop("reasoning_edit"), r"tasks: missing task\(s\) \['reasoning_edit'\]"),
    ("tasks.yaml", lambda d: d["tasks"].update(camera_move=d["tasks"].pop("camera_movement")),
     r"missing task\(s\) \['camera_movement'\]"),
    ("tasks.yaml", lambda d: d["tasks"]["text_change"]["definition"].pop("zh"), "tasks.text_change.definition"),
    ("reflect.yaml", lambda d: d["templates"]["reflect"].update(zh=d["templates"]["reflect"]["zh"] + "{image_id}"),
     r"templates\.reflect\.zh: uses placeholders .*'image_id'"),
    ("ask.yaml", lambda d: d["templates"]["ask_yes_no"]["placeholders"].update(image="the image"),
     r"templates\.ask_yes_no\.en: uses placeholders"),
    ("judge_imgedit.yaml", lambda d: d["templates"]["judge_imgedit_text"]["lines"].update(extra="no group"),
     r"lines\.extra: needs exactly one group"),
])
def test_a_broken_data_file_fails_at_load_naming_file_and_key(copy_folder, file, change, message):
    edit_yaml(copy_folder / file, change)
    with pytest.raises(PromptError, match=rf"{file}: .*{message}"):
        PromptLibrary(copy_folder)


@pytest.mark.parametrize("change, message", [
    (lambda s: s["properties"]["reasoning"].update(maxLength=200), r"\$\.reasoning: keyword\(s\) \['maxLength'\]"),
    (lambda s: s.update(additionalProperties=True), "additionalProperties: false"),
    (lambda s: s["required"].pop(), "every property required"),
    (lambda s: s["properties"]["editing_success"].pop("maximum"), "minimum and maximum"),
    (lambda s: s["properties"]["over_editing"].update(type="integr"), "not a readable, valid JSON Schema"),
])
def test_a_schema_outside_the_structured_output_subset_fails_at_load(copy_folder, change, message):
    path = copy_folder / "schemas/viescore_sc.json"
    schema = json.loads(path.read_text())
    change(schema)
    path.write_text(json.dumps(schema))
    with pytest.raises(PromptError, match=rf"viescore_sc\.json: .*{message}"):
        PromptLibrary(copy_folder)
