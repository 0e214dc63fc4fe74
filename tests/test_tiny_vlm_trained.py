"""The tiny instructor Qwen2.5-VL (workers/tiny_vlm_trained.py), through the VLM worker's own path
(from_pretrained, xgrammar-constrained greedy decoding, the one parser): on source images of the tiny recipe,
which its training never showed it, it gives exactly the replies it was taught, finished and schema-valid."""
from __future__ import annotations

import json

import cv2
import numpy as np

from workers.sample_images import load_sample
from workers.tiny_models import build_tiny
from workers.tiny_vlm_trained import INSTRUCTIONS, conversations
from workers.vlm import TransformersVlmConfig, VlmAnswer, VlmRequest, build_vlm
from workers.vlm_prompts import render


def _source(name: str) -> np.ndarray:
    """A sample at the tiny recipe's working size (short side 224)."""
    image = cv2.imdecode(np.frombuffer(load_sample(name), np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    scale = 224 / min(image.shape[:2])
    return np.ascontiguousarray(cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale))))


def test_the_instructor_gives_its_taught_replies_on_unseen_images():
    folder = build_tiny("qwen2.5-vl-instructor")
    notes = json.loads((folder / "training.json").read_text())
    assert notes["final_reply_loss"] < 0.01
    vlm = build_vlm(TransformersVlmConfig(model="tiny:qwen2.5-vl-instructor", dtype="float32", batch_size=6))
    tasks = tuple(INSTRUCTIONS)
    prompts = [render("propose", "en", tasks=tasks)]
    prompts += [render("reflect", "en", task=task, instruction_en=said["en"], instruction_zh=said["zh"])
                for task, said in INSTRUCTIONS.items()]
    taught = [json.loads(reply) for _, reply in conversations()]
    for name in ("skimage-astronaut", "scene-0003", "text-0002"):  # a photo, a generated scene, a sign
        image = _source(name)
        answers = vlm.ask([VlmRequest([image], prompt, 256) for prompt in prompts])
        assert all(isinstance(a, VlmAnswer) for a in answers), (name, answers)
        assert [a.parsed for a in answers] == taught, name
