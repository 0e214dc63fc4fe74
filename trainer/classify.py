"""Route an instruction to a task id for the MoE gates: an explicit task, else keyword rules.

The reference asks Qwen3-8B to name one of the 15 task labels (src/intention_qwen3.py); a model classifier
can replace `classify` behind the same signature. Without one, the keyword table in task_keywords.yaml
decides, and instructions it cannot place get id 0 ("other"), as in the reference's fallback.
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources

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


def resolve_task(task: str | None, instruction: str) -> int:
    """`--task` as a canonical name or an id, else the classifier's answer."""
    if task is None:
        return classify(instruction)
    if task.isdigit() and int(task) < len(TASKS):
        return int(task)
    return task_by_name(task).id
