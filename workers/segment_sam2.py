"""Box-prompted segmentation with SAM 2 (transformers `Sam2Model`): the union of one mask per box, as the
reference's deletion chain uses SAM (reference-code.md §1.3: `predict_torch(boxes, multimask_output=False)`,
then the union). The transformers model loads like any checkpoint (e.g. facebook/sam2.1-hiera-large) and takes
its input size from its processor (256 px for the tiny test model), where the `sam2` package's predictor is
hard-wired to 1024 px and builds on CUDA by default (environment.md).
"""
from __future__ import annotations

import numpy as np

from workers.model_lifecycle import TransformersPair, need


class Sam2BoxSegmenter(TransformersPair):
    """Loads nothing until the first `segment`."""

    model_class, processor_class = "Sam2Model", "Sam2Processor"

    def segment(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """The union of the masks of `boxes` (float (N, 4): pixel x0, y0, x1, y1) on an RGB uint8 image."""
        torch = need("torch")
        model, processor = self.pair()
        inputs = processor(images=image, input_boxes=[boxes.tolist()], return_tensors="pt")
        inputs = inputs.to(model.device, model.dtype)  # casts the pixels and boxes, not the sizes
        with torch.inference_mode():
            # One mask per box: the reference's multimask_output=False (SAM's pick for an unambiguous prompt).
            outputs = model(**inputs, multimask_output=False)
        masks = processor.post_process_masks(outputs.pred_masks.float().cpu(), inputs["original_sizes"].cpu())[0]
        return masks.any(dim=(0, 1)).numpy()  # (boxes, 1, H, W) -> (H, W)

    def provenance(self) -> dict:
        return {**super().provenance(), "prompt": "boxes, multimask_output=False, union of the masks"}
