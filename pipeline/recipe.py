"""Recipes: YAML → typed, validated config. Unknown keys and bad values are errors naming key and file.

Each stage owns the config block it reads (stages/*.py); this module composes them into a recipe.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml
from pydantic import Field, ValidationError, field_validator

from manifests.config import Strict
from manifests.schema import ROW_STAGES, STAGES
from stages.base import Resources
from stages.edit import EditConfig
from stages.instruct import InstructConfig
from stages.pack import PackConfig
from stages.score import ScoreConfig
from stages.source import InputConfig, SourceConfig

BUILTIN_DIR = Path(__file__).parent / "recipes"


COLOCATABLE = ROW_STAGES[1:]  # the source stage streams from read units, the others map batches


class StageResources(Strict):
    source: Resources = Resources(batch_size=1)  # one read unit per call; the stage streams its samples
    instruct: Resources = Resources()
    edit: Resources = Resources()
    score: Resources = Resources()
    pack: Resources = Resources(batch_size=1)  # one window of shards per call
    # Consecutive stages to run in one actor pool in the fused run (with the first one's resources).
    colocate: list[str] = []

    @field_validator("colocate")
    @classmethod
    def _consecutive(cls, v: list[str]):
        if v and (any(s not in COLOCATABLE for s in v) or len(v) < 2
                  or list(v) != list(COLOCATABLE[COLOCATABLE.index(v[0]):COLOCATABLE.index(v[0]) + len(v)])):
            raise ValueError(f"colocate takes two or more consecutive stages of {list(COLOCATABLE)}, got {v}")
        return v


assert tuple(StageResources.model_fields)[:-1] == STAGES, "one Resources field per stage, in order"


class Recipe(Strict):
    name: str
    seed: int = 0
    commit_rows: int = Field(64, ge=1)  # rows per committed fragment: what a kill can cost at most
    input: InputConfig = InputConfig()
    source: SourceConfig = SourceConfig()
    instruct: InstructConfig = InstructConfig()
    edit: EditConfig = EditConfig()
    score: ScoreConfig = ScoreConfig()
    pack: PackConfig = PackConfig()
    resources: StageResources = StageResources()

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, ensure_ascii=False)

    def hash(self) -> str:
        """Identity of what a run produces; resources only schedule, so they are left out."""
        data = self.model_dump(mode="json", exclude={"resources"})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class RecipeError(ValueError):
    pass


def resolve_path(spec: str) -> Path:
    """A recipe file, or the name of a shipped recipe (e.g. `default-cpu`)."""
    path = Path(spec)
    if path.is_file():
        return path
    builtin = BUILTIN_DIR / f"{spec}.yaml"
    if builtin.is_file():
        return builtin
    shipped = ", ".join(sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml")))
    raise RecipeError(f"recipe {spec!r} not found: not a file, and not a shipped recipe ({shipped})")


def load_recipe(spec: str | Path) -> Recipe:
    path = resolve_path(str(spec))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    return parse_recipe(data, str(path))


def parse_recipe(data: object, origin: str = "<recipe>") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{origin}: a recipe is a mapping, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"]) or "<root>"
            secret = any(_keyish(p) for p in err["loc"])
            got = (f" (got {_short(_redact(err['input']))})"
                   if err["type"] != "missing" and "input" in err and not secret else "")
            lines.append(f"{origin}: {key}: {err['msg']}{got}")
        raise RecipeError("\n".join(lines)) from None


def _keyish(name: object) -> bool:
    return "key" in str(name).lower()


def _redact(value: object) -> object:
    """A value under a key-like name is never echoed: it may be a secret pasted where a variable's name goes."""
    if isinstance(value, dict):
        return {k: "***" if _keyish(k) else _redact(v) for k, v in value.items()}
    return value


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
