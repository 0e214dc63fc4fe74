"""VLM instruction backend with self-reflection: the paper's instruction step (x2edit-paper.md, "Diverse Editing
Instruction Generation"; the released code has no reflection loop, reference-code.md §1.13, so ours is below).

Per source image, one proposal call (prompts/vlm/propose.yaml) writes an English and a Chinese instruction for
every task an instruction-following editor is routed, or two empty strings for a task that does not suit the
image. The stage's balancer then picks among the proposed tasks: a task left empty is None, and the stage
passes to its next task. Each picked instruction is judged against the image (prompts/vlm/reflect.yaml:
grounded, feasible, matches the task, changes the image, right languages), up to `reflection_attempts` times:
  keep     with every check true, and each side in its language by lingua (quoted text aside): it passes;
  rewrite  the fixed instruction is what the next attempt judges, so a rewrite needs one more attempt to pass;
  reject   the same instruction is judged again (a sampled judge may differ; a greedy one will not).
With a `translate` block (workers/translate.py), a proposal or rewrite with one side empty has that side
translated from the other (the trace's `translated` says from which language, by which model) and is judged as
written: the reflection and lingua read the translation like any other side.
Editors that do not follow instructions propose their own ops, as with the rule-based instructor.

Recipe block (`instruct.vlm`, with `instruct.backend: vlm`):

    worker: {backend: openai, base_url: http://127.0.0.1:8000/v1, api_key_env: VLM_API_KEY,
             model: Qwen/Qwen2.5-VL-72B-Instruct}          # any workers/vlm.py config
    prompt_language: en                                    # the templates' variant the VLM reads
    reflection_attempts: 3
    translate: {zh_en: Helsinki-NLP/opus-mt-zh-en, en_zh: Helsinki-NLP/opus-mt-en-zh}   # optional
    propose_max_new_tokens: 1536                           # reflect_max_new_tokens: 384

A candidate that cannot become a pair raises `InstructionRejected` from `propose` (a `Rejected` carrying the
trace for the ledger row's provenance), with one of these reasons, never a guessed instruction:
  instruction_missing_language  the proposal wrote one language only, and no `translate` block fills the other
  reflection_failed             no attempt passed; the last one rejected, failed a check, or rewrote
  instruction_wrong_language    the last attempt kept an instruction whose side lingua finds in another language
  vlm_truncated, vlm_unparseable, vlm_schema_mismatch, vlm_refused, vlm_bad_request, api_malformed_response
                                the proposal's reply, or the last reflection's, was unusable (workers/vlm.py)
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.metadata import version

import lingua
import numpy as np
from pydantic import Field

from manifests.config import Strict
from manifests.rejected import ItemFailed, Rejected
from workers.base import Editor, Proposal, Subject
from workers.rule_instructor import RuleInstructor
from workers.translate import TranslateConfig, Translator
from workers.vlm import VlmAnswer, VlmConfig, VlmRequest, build_vlm, excerpt
from workers.vlm_prompts import LANGUAGES, NAMED_TASKS, Language, RenderedPrompt, render

VERSION = "vlm-1"

CHECKS = ("grounded", "feasible", "matches_task", "changes_image", "languages_ok")  # schemas/reflection.json
# Text to appear in the picture is quoted and copied as written in both languages (tasks.yaml, text_change), so
# it says nothing about the language of the instruction around it. ASCII single quotes are apostrophes too.
_QUOTED = re.compile(r'"[^"]*"|“[^”]*”|‘[^’]*’|「[^」]*」|『[^』]*』')
# An attempt's outcome → the ledger reason when it is the last one.
_FINAL = {"rewritten": "reflection_failed", "rejected": "reflection_failed",
          "wrong_language": "instruction_wrong_language"}
LANGUAGE_ID = f"lingua-language-detector {version('lingua-language-detector')} (en, zh)"


class VlmInstructConfig(Strict):
    worker: VlmConfig
    prompt_language: Language = "en"  # which variant of the templates the VLM reads; it writes both languages
    reflection_attempts: int = Field(3, ge=1, le=10)  # judgements per instruction
    propose_max_new_tokens: int = Field(1536, ge=1)  # ~40 tokens per side per task, 15 tasks, JSON around them
    reflect_max_new_tokens: int = Field(384, ge=1)  # a critique, five booleans and the instruction again
    translate: TranslateConfig | None = None  # fills a side the VLM left empty; without it that is a rejection


class InstructionRejected(Rejected):
    """A candidate pair ended at the instruct stage; `provenance` is its trace, for the ledger row."""

    def __init__(self, reason: str, message: str, provenance: dict) -> None:
        super().__init__(reason, message)
        self.provenance = provenance


@lru_cache(maxsize=1)
def _detector() -> lingua.LanguageDetector:
    # Only the two languages a pair has: with all 75, short instructions are misread ("Add a cat" is Welsh),
    # and the Latin-script models take seconds and most of a gigabyte to load. The price: another Latin-script
    # language passes as English (the reflection's languages_ok check still reads it).
    return lingua.LanguageDetectorBuilder.from_languages(lingua.Language.ENGLISH, lingua.Language.CHINESE).build()


def language_of(text: str) -> str | None:
    """"en", "zh", or None when lingua cannot tell (nothing left outside quotes, another script)."""
    found = _detector().detect_language_of(_QUOTED.sub(" ", text))
    return {lingua.Language.ENGLISH: "en", lingua.Language.CHINESE: "zh"}.get(found)


@dataclass
class _Image:
    """One image's proposal (the parsed reply, or why it is unusable) and each task's outcome so far, so that a
    task asked again for another editor costs no call."""

    key: str
    proposal: dict | Rejected
    trace: dict
    outcomes: dict[str, Proposal | InstructionRejected | None] = field(default_factory=dict)


class VlmInstructor:
    """The Instructor on a VLM; `tasks` are those the proposal asks about (the ones routed to an editor that
    follows instructions)."""

    name = "vlm"
    version = VERSION

    def __init__(self, min_area: float, max_area: float, cfg: VlmInstructConfig,
                 tasks: Sequence[str] = NAMED_TASKS) -> None:
        self.rules = RuleInstructor(min_area, max_area)
        self.cfg, self.tasks = cfg, tuple(tasks)
        self.vlm = build_vlm(cfg.worker)  # cheap: the model loads, or the key is read, on the first call
        self.translator = Translator(cfg.translate) if cfg.translate else None  # loads on its first translation
        self._image: _Image | None = None  # the stage asks about one image at a time

    def analyze(self, image: np.ndarray) -> Subject | None:
        """The rule-based subject, for editors that make their own ops. The proposal call waits for the first
        instruction-following editor asked, so a sample routed only to the others costs no VLM call."""
        return self.rules.analyze(image)

    def propose(self, task: str, editor: Editor, image: np.ndarray, subject: Subject | None,
                rng: np.random.Generator) -> Proposal | None:
        if not editor.follows_instructions:
            return editor.propose(task, image, subject, rng)  # it knows what it can do; the text says just that
        if task not in self.tasks:
            raise ValueError(f"task {task!r} was not in the proposal's tasks {list(self.tasks)}")
        seen = self._proposal(image)
        if task not in seen.outcomes:
            seen.outcomes[task] = self._judge(task, seen, image, rng)
        outcome = seen.outcomes[task]
        if isinstance(outcome, InstructionRejected):
            raise outcome.with_traceback(None)
        return outcome

    def provenance(self) -> dict:
        translate = {"translate": self.translator.provenance()} if self.translator else {}
        return {"worker": self.name, "version": VERSION, "vlm": self.vlm.provenance(),
                "prompt_language": self.cfg.prompt_language, "reflection_attempts": self.cfg.reflection_attempts,
                "language_id": LANGUAGE_ID, **translate}

    def _proposal(self, image: np.ndarray) -> _Image:
        key = f"{hashlib.blake2b(np.ascontiguousarray(image), digest_size=16).hexdigest()}-{image.shape}"
        if self._image is None or self._image.key != key:
            prompt = render("propose", self.cfg.prompt_language, tasks=self.tasks)
            seed = int(key[:8], 16)  # the image's own: one proposal per image, whatever task asks first
            item = self._ask(image, prompt, self.cfg.propose_max_new_tokens, seed)
            trace = {"template": prompt.template_id, "sha256": prompt.sha256, "seed": seed}
            self._image = _Image(key, item.parsed if isinstance(item, VlmAnswer) else item, trace)
        return self._image

    def _ask(self, image: np.ndarray, prompt: RenderedPrompt, max_new_tokens: int,
             seed: int) -> VlmAnswer | Rejected:
        [item] = self.vlm.ask([VlmRequest([image], prompt, max_new_tokens, seed)])
        if isinstance(item, ItemFailed):
            raise item  # out of memory at one request: a failure of the system, not a verdict to keep
        return item

    def _judge(self, task: str, seen: _Image, image: np.ndarray,
               rng: np.random.Generator) -> Proposal | InstructionRejected | None:
        """The proposal's instruction for `task` through up to K reflection attempts."""
        trace = {**self.provenance(), "propose": seen.trace}
        if isinstance(seen.proposal, Rejected):
            return InstructionRejected(seen.proposal.reason, f"the proposal: {seen.proposal.message}",
                                       {**trace, "verdict": seen.proposal.reason})
        proposed = {lang: seen.proposal[task][lang].strip() for lang in LANGUAGES}
        trace["proposed"] = proposed
        if not any(proposed.values()):
            return None  # the VLM found the task unsuitable for this image
        candidate, attempts = proposed, []
        if not all(proposed.values()):
            filled = self._fill(proposed)
            if filled is None:
                written = [lang for lang in LANGUAGES if proposed[lang]]
                return InstructionRejected("instruction_missing_language", f"the proposal wrote only {written}",
                                           {**trace, "verdict": "instruction_missing_language"})
            candidate, trace["translated"] = filled
        for _ in range(self.cfg.reflection_attempts):
            prompt = render("reflect", self.cfg.prompt_language, task=task, instruction_en=candidate["en"],
                            instruction_zh=candidate["zh"])
            seed = int(rng.integers(1 << 31))
            attempt, candidate = _review(self._ask(image, prompt, self.cfg.reflect_max_new_tokens, seed),
                                         candidate, seed, self._fill)
            attempts.append(attempt)
            if attempt["outcome"] == "passed":
                break
        # The instruction slots are not part of the hash, so every attempt of a task shares it.
        trace.update(reflect={"template": prompt.template_id, "sha256": prompt.sha256}, attempts=attempts)
        trace.update(self.provenance())  # models loaded since the trace began: their real revision, dtype, device
        last = attempts[-1]
        if last["outcome"] == "passed":
            return Proposal(task, f"{task}.vlm", {"instruct": {**trace, "verdict": "passed"}},
                            candidate["en"], candidate["zh"])
        reason = _FINAL.get(last["outcome"], last["outcome"])
        said = excerpt(last["reply"]["critique"]) if "reply" in last else last["message"]  # the latter is one
        return InstructionRejected(reason, f"no pass in {len(attempts)} attempt(s); the last {last['outcome']}: "
                                           f"{said}", {**trace, "verdict": reason})


    def _fill(self, instruction: dict[str, str]) -> tuple[dict[str, str], dict] | None:
        """`instruction` with its empty side translated from the written one, and the trace's record of it; None
        without a translator, or when the translation comes out empty."""
        if self.translator is None:
            return None
        source = next(lang for lang in LANGUAGES if instruction[lang])
        target = next(lang for lang in LANGUAGES if lang != source)
        [text] = self.translator.translate([instruction[source]], source)
        if not text:
            return None
        return {**instruction, target: text}, {"from": source, "model": self.translator.model_for(source)}


Fill = Callable[[dict[str, str]], tuple[dict[str, str], dict] | None]


def _review(item: VlmAnswer | Rejected, reviewed: dict[str, str], seed: int,
            fill: Fill) -> tuple[dict, dict[str, str]]:
    """One attempt's record, and the instruction the next attempt judges; a rewrite with one side empty has it
    filled by `fill` when it can."""
    record = {"seed": seed, "reviewed": reviewed,
              "languages": {lang: language_of(reviewed[lang]) for lang in LANGUAGES}}
    if isinstance(item, Rejected):
        return {**record, "outcome": item.reason, "message": item.message}, reviewed
    reply = item.parsed
    record["reply"] = reply
    rewritten = {"en": reply["instruction_en"].strip(), "zh": reply["instruction_zh"].strip()}
    if reply["verdict"] == "rewrite" and any(rewritten.values()) and not all(rewritten.values()):
        filled = fill(rewritten)
        if filled is not None:
            rewritten, record["translated"] = filled
    if reply["verdict"] == "rewrite" and all(rewritten.values()):
        return {**record, "outcome": "rewritten"}, rewritten
    if reply["verdict"] == "keep" and all(reply[check] for check in CHECKS):
        right = all(record["languages"][lang] == lang for lang in LANGUAGES)
        return {**record, "outcome": "passed" if right else "wrong_language"}, reviewed
    # A reject, a keep that fails its own checks, or a rewrite with a side left empty: nothing passes here.
    return {**record, "outcome": "rejected"}, reviewed
