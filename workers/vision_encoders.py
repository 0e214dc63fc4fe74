"""Image encoders behind the learned scorers (filters/aesthetic.py, filters/similarity.py) and the CLIP tagger:
CLIP's projected image and text embeddings, DINOv2's mean-pooled tokens, and Aesthetic Predictor V2.5 (a SigLIP
vision tower and an MLP head). Each is a `TransformersPair`: loaded once on first use, by hub id, folder or
`tiny:<name>`, in the recipe's dtype and device. Embeddings come back L2-normalised in float32, so a cosine is
their dot product.

Real checkpoints (reference-code.md §1.9, §1.11) and their size in bf16, to size a score actor's GPU share:
openai/clip-vit-large-patch14 0.4 B parameters (0.9 GB), facebook/dinov2-giant 1.1 B (2.2 GB),
google/siglip-so400m-patch14-384 0.4 B (0.9 GB) with discus0434's head (aesthetic_predictor_v2_5.pth, 1.3 M).
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Literal

import numpy as np

from manifests.config import Strict
from workers.model_lifecycle import TransformersPair, need

HEAD_FILE = "head.safetensors"  # the head beside the SigLIP weights, where `head:` is not given (the tiny model)
HEAD_WIDTHS = (1024, 128, 64, 16, 1)  # §1.11: input width → 1024 → 128 → 64 → 16 → 1
HEAD_DROPOUT = (0.5, 0.5, 0.5, 0.2)  # inactive in eval; kept so the layer indices match the released file


class EncoderConfig(Strict):
    model: str  # hub id (from the local cache), folder, or tiny:<name>
    revision: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: the actor's GPU if Ray gave it one
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # float32 on a CPU whatever is asked


class AestheticModel(EncoderConfig):
    """model: the SigLIP vision checkpoint (google/siglip-so400m-patch14-384, or tiny:siglip-aesthetic)."""

    # The head's weights: .safetensors, or the released .pth (read with weights_only: tensors, no pickled code).
    # Omitted: head.safetensors in the model's folder (tiny:siglip-aesthetic has one).
    head: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"  # §1.11: the reference runs it in bf16


def normalized(features):
    """Rows scaled to unit length, in float32 (a cosine is then a dot product)."""
    return need("torch").nn.functional.normalize(features.float(), dim=-1)


class ClipEncoder(TransformersPair):
    """CLIP (CLIPModel + CLIPProcessor): projected image and text embeddings."""

    model_class, processor_class = "CLIPModel", "CLIPProcessor"

    def image_features(self, images: list[np.ndarray]):
        model, processor = self.pair()[:2]  # a subclass may load more beside them (the tagger: its vocabulary)
        pixels = processor(images=images, return_tensors="pt").to(model.device, model.dtype)
        with need("torch").inference_mode():
            return normalized(model.get_image_features(**pixels).pooler_output)

    def text_features(self, texts: list[str]):
        return self.encode_texts(*self.pair()[:2], texts)

    @staticmethod
    def encode_texts(model, processor, texts: list[str]):
        """Texts cut at CLIP's 77 tokens, as its position table ends there. Static: a subclass's `_load` embeds
        its fixed texts with the model it has just loaded."""
        tokens = processor(text=texts, return_tensors="pt", padding=True, truncation=True).to(model.device)
        with need("torch").inference_mode():
            return normalized(model.get_text_features(**tokens).pooler_output)


class Dinov2Encoder(TransformersPair):
    """DINOv2 (AutoModel + AutoImageProcessor): the mean of `last_hidden_state` over all tokens, CLS included,
    as the reference pools it (§1.9)."""

    model_class, processor_class = "AutoModel", "AutoImageProcessor"

    def image_features(self, images: list[np.ndarray]):
        model, processor = self.pair()
        pixels = processor(images=images, return_tensors="pt").to(model.device, model.dtype)
        with need("torch").inference_mode():
            return normalized(model(**pixels).last_hidden_state.float().mean(dim=1))


def aesthetic_head(width: int):
    """The V2.5 head as an nn.Sequential: Linear layers at indices 0, 2, 4, 6, 8, dropouts between."""
    nn = need("torch").nn
    layers, inputs = [], width
    for i, outputs in enumerate(HEAD_WIDTHS):
        layers.append(nn.Linear(inputs, outputs))
        if i < len(HEAD_DROPOUT):
            layers.append(nn.Dropout(HEAD_DROPOUT[i]))
        inputs = outputs
    return nn.Sequential(*layers)


def read_head(data: bytes, name: str) -> dict:
    """A head state dict from a file's bytes, keys as `aesthetic_head`'s. The released file holds the head
    module's keys (`scoring_head.0.weight`, …), an export of the whole predictor prefixes them with `layers.`,
    a bare Sequential saved as `layers` has `layers.0.weight`: all three load, and a strict load then refuses
    any other layout (V2's CLIP head puts its last Linear at index 7)."""
    torch = need("torch")
    if name.endswith(".safetensors"):
        from safetensors.torch import load

        state = load(data)
    elif name.endswith((".pth", ".pt")):
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"aesthetic head {name}: expected a .safetensors or .pth file")
    return {key.removeprefix("layers.").removeprefix("scoring_head."): value for key, value in state.items()}


class AestheticPredictor(TransformersPair):
    """Aesthetic Predictor V2.5 (§1.11): the head reads SigLIP's L2-normalised `pooler_output`; one unclamped
    score per image, conventionally read on a 1–10 scale. The head's input width is the vision tower's, so a
    tiny tower works."""

    model_class, processor_class = "SiglipVisionModel", "SiglipImageProcessor"

    def __init__(self, cfg: AestheticModel) -> None:
        super().__init__(cfg.model, cfg.revision, cfg.dtype, cfg.device)
        self.head = cfg.head
        self.head_sha256: str | None = None  # of the file read, once loaded

    def _load(self):
        model, processor = super()._load()
        file = Path(self.head).expanduser() if self.head else self._source.path / HEAD_FILE
        if not file.is_file():
            raise FileNotFoundError(f"aesthetic head {file} not found: name the head file (discus0434's "
                                    f"aesthetic_predictor_v2_5.pth) in the recipe's head:")
        data = file.read_bytes()
        self.head_sha256 = hashlib.sha256(data).hexdigest()[:16]
        head = aesthetic_head(model.config.hidden_size)
        try:
            head.load_state_dict(read_head(data, file.name))
        except RuntimeError as e:  # the wrong file (another predictor, another width): say which file
            raise ValueError(f"aesthetic head {file} does not fit a V2.5 head of width "
                             f"{model.config.hidden_size}: {e}") from e
        return model, processor, head.to(model.device, model.dtype).eval()

    def predict(self, images: list[np.ndarray]) -> list[float]:
        """One score per image (the source stage's prefilter calls it with one)."""
        model, processor, head = self.pair()
        pixels = processor(images=images, return_tensors="pt").to(model.device, model.dtype)
        with need("torch").inference_mode():
            pooled = model(**pixels).pooler_output
            return head(pooled / pooled.norm(dim=-1, keepdim=True)).squeeze(-1).float().tolist()

    def provenance(self) -> dict:
        return {**super().provenance(), "head": self.head or HEAD_FILE, "head_sha256": self.head_sha256}
