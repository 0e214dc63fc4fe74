"""Open-vocabulary image tagging by CLIP zero-shot (transformers `CLIPModel` + `CLIPProcessor`) over a closed tag
vocabulary shipped as data (prompts/removal_tags.yaml: English and Chinese names, and the text prompt).

The route is named for what it is, "clip-zero-shot": CLIP scores the image against one prompt per tag, a softmax
over the vocabulary turns the scores into probabilities, and the `top_k` best that reach `threshold` come back,
best first. A softmax over a closed list ranks tags; it does not say that an object is present (a detector
downstream decides that). RAM++, the open-set tagger the architecture names, needs the `ram` package, which is
not installed here; the reference's own tagger (a TResNet + ML-Decoder over 4,088 Chinese tags) ships no weights.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import yaml

from workers.model_lifecycle import need
from workers.vision_encoders import ClipEncoder

ROUTE = "clip-zero-shot"


@dataclass(frozen=True)
class Tag:
    en: str
    zh: str


@dataclass(frozen=True)
class Vocabulary:
    prompt: str  # CLIP text prompt with an {en} slot
    tags: tuple[Tag, ...]
    sha256: str  # of the file, for provenance


@functools.cache
def data_text(name: str) -> str:
    """A data file: an absolute path, or a name in prompts/."""
    path = Path(name)
    file = path if path.is_absolute() else resources.files("prompts").joinpath(name)
    return file.read_text("utf-8")


def load_vocabulary(name: str = "removal_tags.yaml") -> Vocabulary:
    text = data_text(name)
    data = yaml.safe_load(text)
    tags = tuple(Tag(en=str(t["en"]), zh=str(t["zh"])) for t in data["tags"])
    clothing = [t.zh for t in tags if "衣" in t.zh]
    if clothing:  # the reference drops these: removing what a person wears leaves a person, not a background
        raise ValueError(f"vocabulary {name}: clothing tags {clothing} cannot be removed")
    return Vocabulary(prompt=data["prompt"], tags=tags, sha256=hashlib.sha256(text.encode()).hexdigest()[:16])


class ClipTagger(ClipEncoder):
    """CLIP zero-shot over a closed vocabulary: (tag, probability) pairs, best first."""

    def __init__(self, model: str, revision: str | None, dtype: str, vocabulary: Vocabulary, top_k: int,
                 threshold: float) -> None:
        super().__init__(model, revision, dtype)
        self.vocabulary, self.top_k, self.threshold = vocabulary, top_k, threshold

    def _load(self):
        model, processor = super()._load()
        prompts = [self.vocabulary.prompt.format(en=tag.en) for tag in self.vocabulary.tags]
        return model, processor, self.encode_texts(model, processor, prompts)  # the vocabulary's, once

    def tag(self, image: np.ndarray) -> list[tuple[Tag, float]]:
        model, _, text = self.pair()
        embedding = self.image_features([image])
        with need("torch").inference_mode():
            probs = (model.logit_scale.exp().float() * embedding @ text.T).softmax(-1)[0].cpu().numpy()
        best = np.argsort(-probs, kind="stable")[:self.top_k]
        return [(self.vocabulary.tags[i], float(probs[i])) for i in best if probs[i] >= self.threshold]

    def provenance(self) -> dict:
        return {"route": ROUTE, **super().provenance(), "prompt": self.vocabulary.prompt,
                "tags": len(self.vocabulary.tags), "vocabulary_sha256": self.vocabulary.sha256,
                "top_k": self.top_k, "threshold": self.threshold}
