"""The VLM prompt templates (prompts/vlm/*.yaml and their JSON schemas): load, validate, render.

    from workers.vlm_prompts import render
    p = render("reflect", "zh", task="camera_movement", instruction_en="...", instruction_zh="...")
    p.text, p.schema, p.images, p.template_id, p.sha256   # template_id and sha256 go into the provenance

Everything is checked when a folder is loaded, so a broken data file stops the run at start-up with the file
and key named, not on the millionth sample: the tasks are exactly the taxonomy's named tasks, each template
has an English and a Chinese text taking the same declared placeholders, and each schema is valid JSON Schema
(checked with `jsonschema`, which ray installs) within the subset every structured-output backend we target
decodes correctly. Template syntax: `{name}` (lower case and underscores) is a placeholder, any other brace is
literal text, so JSON examples in a prompt need no escaping. A file's `parts` are shared texts, inserted at
load time wherever a template names them.
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from manifests.taxonomy import TASKS

Language = Literal["en", "zh"]
LANGUAGES: tuple[Language, ...] = ("en", "zh")
DEFAULT_FOLDER = Path(str(resources.files("prompts"))) / "vlm"
NAMED_TASKS = tuple(t.name for t in TASKS if t.id != 0)  # "other" is never proposed, so it has no definition
IMAGE_ROLES = {"source", "edited", "image"}  # "image": whichever one image the caller asks about
# Placeholders the loader fills from tasks.yaml: {tasks} from render(tasks=...), the others from the `task` slot.
TASK_SLOTS = {"tasks", "task_label", "task_definition"}
# The JSON Schema keywords xgrammar, vLLM and OpenAI-style structured outputs all decode faithfully. Length
# bounds on strings are out: xgrammar 0.2.8 lets raw control characters into such strings (environment.md).
_SCHEMA_KEYWORDS = {"title", "description", "type", "properties", "required", "additionalProperties", "enum",
                    "minimum", "maximum"}
_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


class PromptError(ValueError):
    pass


@dataclass(frozen=True)
class RenderedPrompt:
    text: str
    schema: dict[str, Any] | None  # JSON Schema for structured output; None for a plain-line reply
    lines: dict[str, str] | None  # field -> regex with one group, for a plain-line reply
    images: tuple[str, ...]  # roles of the images that go before the text, in order
    template_id: str  # "<name>/<language>@<file version>"
    sha256: str  # of the template text, what the loader inserted, and the schema or line format


@dataclass(frozen=True)
class TaskText:
    label: dict[str, str]
    definition: dict[str, str]
    examples: tuple[dict[str, str], ...]


@dataclass(frozen=True)
class Template:
    name: str
    version: str
    path: Path
    text: dict[str, str]  # per language, shared parts already inserted
    placeholders: frozenset[str]
    images: tuple[str, ...]
    schema: dict[str, Any] | None
    lines: dict[str, str] | None


def _fail(path: Path, key: str, message: str) -> PromptError:
    return PromptError(f"{path}: {key}: {message}")


def _read_yaml(path: Path, keys: set[str]) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text("utf-8"))
    except yaml.YAMLError as e:
        raise PromptError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("version"), str) or not data["version"]:
        raise _fail(path, "version", "a file needs a top-level mapping with a non-empty version")
    if unknown := data.keys() - keys - {"version"}:
        raise _fail(path, ", ".join(sorted(unknown)), f"unknown key; expected {sorted(keys | {'version'})}")
    return data


def _bilingual(value: Any, path: Path, key: str) -> dict[str, str]:
    """An {en, zh} pair of non-empty strings."""
    if not isinstance(value, dict) or set(value) != set(LANGUAGES):
        raise _fail(path, key, "needs exactly the keys en and zh")
    for lang in LANGUAGES:
        if not isinstance(value[lang], str) or not value[lang].strip():
            raise _fail(path, f"{key}.{lang}", "needs a non-empty string")
    return value


def _placeholders(text: str) -> set[str]:
    return set(_PLACEHOLDER.findall(text))


def _fill(text: str, values: Mapping[str, str]) -> str:
    """One pass, so a value that itself contains `{name}` is inserted verbatim, never expanded."""
    return _PLACEHOLDER.sub(lambda m: values[m[1]], text)


def _load_tasks(path: Path) -> tuple[dict[str, TaskText], dict[str, dict[str, str]]]:
    data = _read_yaml(path, {"format", "tasks"})
    fmt = data.get("format")
    if not isinstance(fmt, dict) or set(fmt) != set(LANGUAGES):
        raise _fail(path, "format", "needs exactly the keys en and zh")
    for lang in LANGUAGES:
        for part, wanted in (("task", {"name", "label", "definition"}), ("example", {"example"})):
            text = fmt[lang].get(part) if isinstance(fmt[lang], dict) else None
            if not isinstance(text, str) or _placeholders(text) != wanted:
                raise _fail(path, f"format.{lang}.{part}", f"needs a string with the placeholders {sorted(wanted)}")
    raw = data.get("tasks")
    if not isinstance(raw, dict):
        raise _fail(path, "tasks", "needs a mapping of task name to definition")
    if missing := [n for n in NAMED_TASKS if n not in raw]:
        raise _fail(path, "tasks", f"missing task(s) {missing} (manifests/taxonomy.py names {list(NAMED_TASKS)})")
    if unknown := sorted(set(raw) - set(NAMED_TASKS)):
        raise _fail(path, "tasks", f"unknown task(s) {unknown}; the taxonomy's named tasks are {list(NAMED_TASKS)}")
    tasks = {}
    for name in NAMED_TASKS:
        entry, key = raw[name], f"tasks.{name}"
        if not isinstance(entry, dict) or set(entry) != {"label", "definition", "examples"}:
            raise _fail(path, key, "needs exactly label, definition and examples")
        examples = entry["examples"]
        if not isinstance(examples, list) or not 2 <= len(examples) <= 3:
            raise _fail(path, f"{key}.examples", "needs 2 or 3 examples")
        tasks[name] = TaskText(_bilingual(entry["label"], path, f"{key}.label"),
                               _bilingual(entry["definition"], path, f"{key}.definition"),
                               tuple(_bilingual(e, path, f"{key}.examples[{i}]") for i, e in enumerate(examples)))
    return tasks, fmt


def _check_structured(node: Any, path: Path, key: str) -> None:
    """Only objects with every property required and no extra keys, bounded integers, enums, booleans, strings."""
    if not isinstance(node, dict):
        raise _fail(path, key, "a schema node must be an object")
    if unknown := node.keys() - _SCHEMA_KEYWORDS:
        raise _fail(path, key, f"keyword(s) {sorted(unknown)} not allowed; use only {sorted(_SCHEMA_KEYWORDS)}")
    kind = node.get("type")
    if kind == "object":
        props = node.get("properties", {})
        if node.get("additionalProperties") is not False or sorted(node.get("required", [])) != sorted(props):
            raise _fail(path, key, "an object needs additionalProperties: false and every property required")
        for name, sub in props.items():
            _check_structured(sub, path, f"{key}.{name}")
    elif kind == "integer" and not {"minimum", "maximum"} <= node.keys():
        raise _fail(path, key, "an integer needs minimum and maximum")
    elif kind not in ("object", "integer", "string", "boolean"):
        raise _fail(path, key, f"type {kind!r} not allowed; use object, integer, string or boolean")


def _load_schema(path: Path) -> dict[str, Any]:
    try:
        schema = json.loads(path.read_text("utf-8"))
        Draft202012Validator.check_schema(schema)
    except (OSError, json.JSONDecodeError, SchemaError) as e:
        raise PromptError(f"{path}: not a readable, valid JSON Schema: {e}") from None
    if schema.get("type") != "object":
        raise _fail(path, "type", "the top level must be an object (structured outputs require it)")
    _check_structured(schema, path, "$")
    return schema


def _check_lines(lines: Any, path: Path, key: str) -> None:
    if not isinstance(lines, dict) or not lines:
        raise _fail(path, key, "needs a mapping of field to regular expression")
    for field, pattern in lines.items():
        try:
            groups = re.compile(pattern).groups
        except (re.error, TypeError) as e:
            raise _fail(path, f"{key}.{field}", f"not a regular expression: {e}") from None
        if groups != 1:
            raise _fail(path, f"{key}.{field}", "needs exactly one group (the value)")


def _load_template(path: Path, version: str, name: str, entry: Any, parts: dict[str, dict[str, str]]) -> Template:
    key = f"templates.{name}"
    if not isinstance(entry, dict) or not {"images", "placeholders", *LANGUAGES} <= entry.keys():
        raise _fail(path, key, "needs images, placeholders, en and zh")
    if unknown := entry.keys() - {"images", "placeholders", "schema", "lines", *LANGUAGES}:
        raise _fail(path, key, f"unknown key(s) {sorted(unknown)}")
    if ("schema" in entry) == ("lines" in entry):
        raise _fail(path, key, "needs exactly one of schema (a JSON reply) and lines (a plain-line reply)")
    images, declared = entry["images"], entry["placeholders"]
    if not isinstance(images, list) or not set(images) <= IMAGE_ROLES:
        raise _fail(path, f"{key}.images", f"needs a list of image roles from {sorted(IMAGE_ROLES)}")
    if not isinstance(declared, dict):
        raise _fail(path, f"{key}.placeholders", "needs a mapping of placeholder to its description")
    text = _bilingual({lang: entry[lang] for lang in LANGUAGES}, path, key)
    for lang in LANGUAGES:
        text[lang] = _PLACEHOLDER.sub(lambda m: parts.get(m[1], {}).get(lang, m[0]), text[lang])
        if (found := _placeholders(text[lang])) != set(declared):
            raise _fail(path, f"{key}.{lang}", f"uses placeholders {sorted(found)} but declares {sorted(declared)}")
    if {"task_label", "task_definition"} & set(declared) and "task" not in declared:
        raise _fail(path, f"{key}.placeholders", "task_label and task_definition come from a task placeholder")
    schema = _load_schema(path.parent / "schemas" / entry["schema"]) if "schema" in entry else None
    if "tasks" in declared and (schema is None or list(schema["properties"]) != list(NAMED_TASKS)):
        raise _fail(path, f"{key}.schema", f"a task-list prompt's schema needs the properties {list(NAMED_TASKS)}")
    if "lines" in entry:
        _check_lines(entry["lines"], path, f"{key}.lines")
    return Template(name, version, path, text, frozenset(declared), tuple(images), schema, entry.get("lines"))


def _load_templates(path: Path) -> list[Template]:
    data = _read_yaml(path, {"parts", "templates"})
    parts = {name: _bilingual(text, path, f"parts.{name}") for name, text in (data.get("parts") or {}).items()}
    raw = data.get("templates")
    if not isinstance(raw, dict) or not raw:
        raise _fail(path, "templates", "needs a mapping of template name to template")
    used = {p for entry in raw.values() if isinstance(entry, dict)
            for lang in LANGUAGES if isinstance(entry.get(lang), str) for p in _placeholders(entry[lang])}
    if unused := sorted(parts.keys() - used):
        raise _fail(path, "parts", f"part(s) {unused} used by no template")
    return [_load_template(path, data["version"], name, entry, parts) for name, entry in raw.items()]


class PromptLibrary:
    """One folder of templates (prompts/vlm by default; tests load edited copies)."""

    def __init__(self, folder: Path = DEFAULT_FOLDER) -> None:
        self.folder = Path(folder)
        self.tasks, self._format = _load_tasks(self.folder / "tasks.yaml")
        self.templates: dict[str, Template] = {}
        for path in sorted(self.folder.glob("*.yaml")):
            if path.name == "tasks.yaml":
                continue
            for template in _load_templates(path):
                if template.name in self.templates:
                    other = self.templates[template.name].path.name
                    raise _fail(path, f"templates.{template.name}", f"name already used in {other}")
                self.templates[template.name] = template

    def slots(self, name: str) -> frozenset[str]:
        """The slots a caller passes to render this template."""
        return self._template(name).placeholders - TASK_SLOTS

    def render(self, name: str, language: Language, /, *, tasks: Sequence[str] | None = None,
               **slots: str) -> RenderedPrompt:
        t = self._template(name)
        where = f"template {name!r} ({t.path})"
        if language not in LANGUAGES:
            raise PromptError(f"{where}: language {language!r} is not one of {LANGUAGES}")
        if filled := sorted(TASK_SLOTS & slots.keys()):
            raise PromptError(f"{where}: slot(s) {filled} are filled by the loader from tasks.yaml")
        needed = self.slots(name)
        if missing := sorted(needed - slots.keys()):
            raise PromptError(f"{where}: missing slot(s) {missing}")
        if unknown := sorted(slots.keys() - needed):
            raise PromptError(f"{where}: unknown slot(s) {unknown}; it takes {sorted(needed)}")
        if empty := sorted(k for k, v in slots.items() if not isinstance(v, str) or not v.strip()):
            raise PromptError(f"{where}: slot(s) {empty} need a non-empty string")
        inserted, schema = self._task_slots(t, where, language, tasks, slots.get("task"))
        text = _fill(t.text[language], {**inserted, **slots})
        identity = {"text": t.text[language], "inserted": inserted, "schema": schema, "lines": t.lines}
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        return RenderedPrompt(text, copy.deepcopy(schema), dict(t.lines) if t.lines else None, t.images,
                              f"{name}/{language}@{t.version}", digest)

    def _task_entry(self, name: str, language: Language) -> str:
        fmt, task = self._format[language], self.tasks[name]
        head = _fill(fmt["task"], {"name": name, "label": task.label[language],
                                   "definition": task.definition[language]})
        return "\n".join([head, *(_fill(fmt["example"], {"example": e[language]}) for e in task.examples)])

    def _template(self, name: str) -> Template:
        if name not in self.templates:
            raise PromptError(f"unknown template {name!r}; {self.folder} has {sorted(self.templates)}")
        return self.templates[name]

    def _task_slots(self, t: Template, where: str, language: Language, tasks: Sequence[str] | None,
                    task: str | None) -> tuple[dict[str, str], dict[str, Any] | None]:
        """What the loader writes from tasks.yaml, and the schema narrowed to the chosen tasks."""
        inserted: dict[str, str] = {}
        schema = t.schema
        if "tasks" in t.placeholders:
            if tasks is not None and (not tasks or set(tasks) - set(NAMED_TASKS)):
                raise PromptError(f"{where}: tasks= needs named tasks of {list(NAMED_TASKS)}, got {list(tasks)}")
            chosen = [n for n in NAMED_TASKS if tasks is None or n in tasks]  # taxonomy order: a stable hash
            inserted["tasks"] = "\n".join(self._task_entry(n, language) for n in chosen)
            assert schema is not None  # a task-list template has one (checked at load)
            schema = {**schema, "properties": {n: schema["properties"][n] for n in chosen}, "required": chosen}
        elif tasks is not None:
            raise PromptError(f"{where}: has no task list, so tasks= does not apply")
        if task is not None and "task_definition" in t.placeholders:
            if task not in self.tasks:
                raise PromptError(f"{where}: task {task!r} is not one of the named tasks {list(NAMED_TASKS)}")
            inserted["task_label"] = self.tasks[task].label[language]
            inserted["task_definition"] = self.tasks[task].definition[language]
        return inserted, schema


@lru_cache(maxsize=1)
def library() -> PromptLibrary:
    """The shipped templates, loaded and checked once per process."""
    return PromptLibrary()


def render(name: str, language: Language, /, *, tasks: Sequence[str] | None = None, **slots: str) -> RenderedPrompt:
    """Render a shipped template; see PromptLibrary.render."""
    return library().render(name, language, tasks=tasks, **slots)
