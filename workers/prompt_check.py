"""Screening prompts before they become synthetic sources, behind one small interface that an LLM-backed
classifier (the VLM issue) fills the same way: `check(prompt) -> (ok, reason)`.

Until then: `KeywordPromptCheck`, honestly named — a keyword rule that can only look at the words
(prompts/prompt_check.yaml), not the yes/no judgement of an LLM the reference asks for (§1.9/§1.10).
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import ClassVar, Literal, Protocol

import yaml

from manifests.config import Strict


class PromptCheck(Protocol):
    name: ClassVar[str]

    def check(self, prompt: str) -> tuple[bool, str]:
        """(True, "") for a usable drawing prompt, else (False, why)."""


@lru_cache(maxsize=1)
def _rule() -> dict:
    return yaml.safe_load(resources.files("prompts").joinpath("prompt_check.yaml").read_text("utf-8"))


class KeywordPromptCheck:
    name = "keyword_rule"

    class Config(Strict):
        backend: Literal["keyword_rule"] = "keyword_rule"

    def __init__(self, cfg: Config | None = None) -> None:
        self.cfg = cfg or self.Config()
        self.version = _rule()["version"]

    def check(self, prompt: str) -> tuple[bool, str]:
        rule = _rule()
        text = " ".join(prompt.split()).lower()
        if len(text) < rule["min_chars"]:
            return False, f"shorter than {rule['min_chars']} characters"
        if len(text) > rule["max_chars"]:
            return False, f"longer than {rule['max_chars']} characters"
        for words in rule["blocked"]:
            hit = next((w for w in words if w in text), None)
            if hit is not None:
                return False, f"contains the blocked word {hit!r}"
        return True, ""
