"""The one task taxonomy of the project.

Ids, Chinese names and aliases follow the X2Edit reference code (`infer.py`'s label set and the training
loader's `to_type_id` map in `src/custom_dataset_1024.py`). Id 0 is the catch-all "other". The reference
code keeps five diverging copies of this map; everything here (pipeline, manifests, trainer) uses this one.
Where the copies disagree we follow the 1024 loader and add the extra names the 512 loader knows
(`复杂推理` → 13), since that loses no sample.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    id: int
    name: str  # canonical English name, snake_case; used in recipes, manifests and pair ids
    name_zh: str  # the reference code's Chinese label (what its VLM prompts and shards use)
    aliases: tuple[str, ...]  # other labels found in reference-format shards


TASKS: tuple[Task, ...] = (
    Task(0, "other", "其他", ("unknown", "主题生成", "证件照生成")),
    Task(1, "subject_removal", "删除主体",
         ("removal", "remove", "ObjectRemoval", "WaterMarkRemoval", "SnowRemoval", "Delete")),
    Task(2, "subject_addition", "添加主体", ("addition", "add")),
    Task(3, "style_change", "风格更改", ("style", "change style", "style change")),
    Task(4, "background_change", "背景更改", ("change background",)),
    Task(5, "color_change", "颜色更改", ("color_alter", "Colorization")),
    Task(6, "material_change", "材料更改", ("material_alter", "材质更改", "visual_material_change")),
    Task(7, "action_change", "动作更改", ("motion_change", "attribute_modification")),
    Task(8, "subject_replacement", "替换主体", ("subject-replace", "swap", "replace", "replace object")),
    Task(9, "portrait_retouch", "人物修图", ("ps_human", "appearance_alter", "change expression")),
    Task(10, "text_change", "文字更改", ("text change",)),
    Task(11, "tone_transformation", "色调变换", ("色调迁移", "tune_transfer", "tone_transfer")),
    Task(12, "camera_movement", "相机移动",
         ("movement", "rotation_change", "resize", "Camera Move Editing")),
    Task(13, "reasoning_edit", "复杂推理", ("Reasoning", "implicit_change", "relation", "Reasoning Editing")),
    Task(14, "low_level", "low_leval", ("low-level", "control_to_image")),
    Task(15, "subject_driven", "subject", ("style transfer", "subject-driven")),
)

NUM_TASK_IDS = 16  # size of the trainer's task embedding (nn.Embedding(16, 3072) in the reference)

_BY_LABEL: dict[str, Task] = {}
for _task in TASKS:
    for _label in (_task.name, _task.name_zh, *_task.aliases):
        _BY_LABEL.setdefault(_label.casefold(), _task)


class UnknownTaskError(ValueError):
    pass


def task_by_name(name: str) -> Task:
    """The task with this canonical name; a clear error otherwise (recipes use canonical names)."""
    for task in TASKS:
        if task.name == name:
            return task
    known = ", ".join(t.name for t in TASKS)
    raise UnknownTaskError(f"unknown task {name!r}; known tasks: {known}")


def task_for_label(label: str | None) -> Task:
    """Map any label found in the wild (English, Chinese, reference alias) to a task; unknown → other.

    Matching is case-insensitive and ignores surrounding whitespace, as reference shards are not consistent.
    """
    if not label:
        return TASKS[0]
    return _BY_LABEL.get(label.strip().casefold(), TASKS[0])
