"""Route an instruction to a task id for the MoE gates: an explicit task, an LLM, or keyword rules.

The reference asks Qwen3-8B to name one of the 15 task labels (src/intention_qwen3.py); `LLMTaskClassifier`
does the same with any chat LM loaded by `from_pretrained` (prompt in classify_prompt.txt). Without a
model, or when the model's answer names no label, the keyword table in task_keywords.yaml decides, and
instructions it cannot place get id 0 ("other"), as in the reference's fallback.
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources

import torch
import yaml

from manifests.taxonomy import TASKS, task_by_name


@lru_cache(maxsize=1)
def keyword_table() -> dict[str, list[str]]:
    table = yaml.safe_load(resources.files("trainer").joinpath("task_keywords.yaml").read_text("utf-8"))
    for name in table:
        task_by_name(name)  # a typo in the table fails loudly
    return table


def classify(instruction: str) -> int:
    text = instruction.casefold()
    best, best_hits = 0, 0
    for name, words in keyword_table().items():
        hits = sum(word in text for word in words)
        if hits > best_hits:
            best, best_hits = task_by_name(name).id, hits
    return best


def label_in(text: str) -> int | None:
    """The task whose label (Chinese name, canonical name or alias) appears first in a model's answer."""
    folded = text.casefold()
    found = [(folded.find(label.casefold()), task.id) for task in TASKS[1:]
             for label in (task.name_zh, task.name, *task.aliases) if label.casefold() in folded]
    return min(found)[1] if found else None


class LLMTaskClassifier:
    """A chat LM asked to name the task (greedy, a few tokens), as the reference's intention model."""

    def __init__(self, model_path: str, device: str = "cpu"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path).to(device).eval()
        template = resources.files("trainer").joinpath("classify_prompt.txt").read_text("utf-8")
        labels = "\n".join(f"- {t.name_zh} ({t.name})" for t in TASKS[1:])
        self.prompt = template.replace("{labels}", labels)

    @torch.no_grad()
    def answer(self, instruction: str) -> str:
        messages = [{"role": "user", "content": self.prompt.replace("{instruction}", instruction)}]
        inputs = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                    return_dict=True).to(self.model.device)
        out = self.model.generate(**inputs, max_new_tokens=16, do_sample=False)
        return self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    def __call__(self, instruction: str) -> int:
        found = label_in(self.answer(instruction))
        return classify(instruction) if found is None else found


def resolve_task(task: str | None, instruction: str, classifier: LLMTaskClassifier | None = None) -> int:
    """`--task` as a canonical name or an id, else the classifier's answer, else the keyword rules."""
    if task is None:
        return classifier(instruction) if classifier is not None else classify(instruction)
    if task.isdigit() and int(task) < len(TASKS):
        return int(task)
    return task_by_name(task).id
