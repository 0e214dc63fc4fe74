"""Inference: task routing and the edit command on the tiny FLUX with a saved adapter."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from trainer.classify import classify, resolve_task  # noqa: E402


def test_instructions_are_routed_to_their_task():
    assert classify("Remove the red object in the center of the image.") == 1
    assert classify("删除画面中央的红色物体。") == 1
    assert classify("Turn the photo into a watercolor painting") == 3
    assert classify("Blur the background behind the dog") == 4
    assert classify("Zoom in on the center by 30%") == 12
    assert classify("把照片色调变暖") == 11
    assert classify("Frobnicate the quux") == 0
    assert resolve_task("subject_addition", "anything") == 2 and resolve_task("7", "anything") == 7
    with pytest.raises(ValueError, match="unknown task"):
        resolve_task("no_such_task", "x")


def test_edit_command_writes_an_image(tmp_path):
    from diffusers import FluxTransformer2DModel

    from trainer.adapter_io import save_adapter
    from trainer.edit import main
    from trainer.moe_lora import MoELoRAConfig
    from trainer.placement import install_moe_lora
    from trainer.tiny_flux import build_tiny_flux

    base = build_tiny_flux(tmp_path / "tiny")
    transformer = FluxTransformer2DModel.from_pretrained(base, subfolder="transformer")
    install_moe_lora(transformer, MoELoRAConfig(rank=8, alpha=8, num_experts=4))
    save_adapter(transformer, tmp_path / "adapter", base_model_id=str(base))
    Image.fromarray(np.full((40, 56, 3), 128, np.uint8)).save(tmp_path / "in.jpg")
    out = tmp_path / "out.png"
    main(["--adapter", str(tmp_path / "adapter"), "--image", str(tmp_path / "in.jpg"), "--instruction",
          "Remove the red object", "--out", str(out), "--resolution", "32", "--steps", "2",
          "--max-sequence-length", "16", "--device", "cpu"])
    result = Image.open(out)
    assert result.size == (32, 32) and result.mode == "RGB"


def test_an_llm_classifier_names_the_task_or_falls_back_to_the_rules(tmp_path):
    from trainer.classify import LLMTaskClassifier, label_in
    from trainer.tiny_flux import build_tiny_qwen2_lm

    assert label_in("删除主体") == 1 and label_in("Answer: camera_movement.") == 12
    assert label_in("I think style change, not background") == 3  # the first label named wins
    assert label_in("no idea") is None
    classifier = LLMTaskClassifier(str(build_tiny_qwen2_lm(tmp_path / "lm")))
    instruction = "Remove the red object"
    raw = classifier.answer(instruction)  # a random-weight LM: any text at all
    expected = label_in(raw) if label_in(raw) is not None else classify(instruction)
    assert classifier(instruction) == expected == resolve_task(None, instruction, classifier)
