"""Open-vocabulary detection with Grounding DINO (transformers `GroundingDinoForObjectDetection`): the boxes of
one phrase in an image, as the reference's deletion chain asks for them (reference-code.md §1.3).

The caption is the phrase lower-cased with a trailing "." (Grounding DINO separates phrases by dots). A box is
kept when its best token score exceeds `box_threshold`; `text_threshold` only decides which caption tokens
name the box, so with one phrase per caption it changes nothing and is recorded for provenance. The image is
resized by the checkpoint's processor (800 short side, 1333 long, as in the reference). Every box above the
threshold is returned, as the reference passes them all to SAM.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from workers.model_lifecycle import TransformersPair, need


@dataclass(frozen=True)
class Boxes:
    xyxy: np.ndarray  # float (N, 4), pixels of the image (clipped to it): x0, y0, x1, y1
    scores: np.ndarray  # float (N,)


class GroundingDino(TransformersPair):
    model_class, processor_class = "GroundingDinoForObjectDetection", "GroundingDinoProcessor"

    def __init__(self, model: str, revision: str | None, dtype: str, box_threshold: float,
                 text_threshold: float) -> None:
        """Loads nothing: the model loads on the first `detect`."""
        super().__init__(model, revision, dtype)
        self.box_threshold, self.text_threshold = box_threshold, text_threshold

    def detect(self, image: np.ndarray, phrase: str) -> Boxes:
        """The boxes of `phrase` in an RGB uint8 image, highest score first."""
        torch = need("torch")
        model, processor = self.pair()
        inputs = processor(images=image, text=f"{phrase.lower()}.", return_tensors="pt")
        inputs = inputs.to(model.device, model.dtype)  # casts the pixels only, not the token ids
        with torch.inference_mode():
            outputs = model(**inputs)
        outputs.logits, outputs.pred_boxes = outputs.logits.float(), outputs.pred_boxes.float()
        found = processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=self.box_threshold, text_threshold=self.text_threshold,
            target_sizes=[image.shape[:2]])[0]
        order = found["scores"].argsort(descending=True)
        height, width = image.shape[:2]
        xyxy = np.clip(found["boxes"][order].double().cpu().numpy(), 0, [width, height, width, height])
        return Boxes(xyxy=xyxy, scores=found["scores"][order].double().cpu().numpy())

    def provenance(self) -> dict:
        return {**super().provenance(), "box_threshold": self.box_threshold, "text_threshold": self.text_threshold,
                "caption": "<tag en, lower case>."}
