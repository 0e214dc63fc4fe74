"""Machine translation between the pair's two languages: the fallback that fills an instruction side the VLM left
empty (issue 11: "the VLM writes both, or a translation worker fills the other"). The reference translates zh→en
with Helsinki-NLP/opus-mt-zh-en through a transformers pipeline at max_length 256 (reference-code.md §1.7); here
MarianMTModel and MarianTokenizer are loaded directly (the pipeline adds nothing but a model download path), with
greedy decoding so that one text always gets one translation.

Recipe block (`instruct.vlm.translate`):

    zh_en: Helsinki-NLP/opus-mt-zh-en      # hub id (local cache only), folder, or tiny:marian
    en_zh: Helsinki-NLP/opus-mt-en-zh
    dtype: float32
    max_length: 256                        # tokens, of the input and of the translation
    batch_size: 16

MarianTokenizer needs the `sentencepiece` package (the opus-mt checkpoints ship SentencePiece models).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from manifests.config import Strict
from workers.model_lifecycle import TransformersPair, library_versions, need
from workers.vlm_prompts import Language


class TranslateConfig(Strict):
    zh_en: str = "Helsinki-NLP/opus-mt-zh-en"
    en_zh: str = "Helsinki-NLP/opus-mt-en-zh"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_length: int = Field(256, ge=1)  # reference-code.md §1.7
    batch_size: int = Field(16, ge=1)


class MarianPair(TransformersPair):
    model_class = "MarianMTModel"
    processor_class = "MarianTokenizer"


class Translator:
    """One Marian model per direction, each loaded on its first use (a run whose VLM writes both languages loads
    neither)."""

    def __init__(self, cfg: TranslateConfig) -> None:
        """Loads nothing."""
        self.cfg = cfg
        self.pairs: dict[Language, MarianPair] = {"zh": MarianPair(cfg.zh_en, None, cfg.dtype),
                                                  "en": MarianPair(cfg.en_zh, None, cfg.dtype)}

    def model_for(self, source_language: Language) -> str:
        return self.pairs[source_language].model_name

    def translate(self, texts: list[str], source_language: Language) -> list[str]:
        """`texts` from `source_language` into the other language, in order."""
        torch = need("torch")
        model, tokenizer = self.pairs[source_language].pair()
        out: list[str] = []
        for start in range(0, len(texts), self.cfg.batch_size):
            batch = tokenizer(texts[start:start + self.cfg.batch_size], return_tensors="pt", padding=True,
                              truncation=True, max_length=self.cfg.max_length).to(model.device)
            with torch.inference_mode():
                ids = model.generate(**batch, num_beams=1, do_sample=False, max_length=self.cfg.max_length)
            out.extend(text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True))
        return out

    def provenance(self) -> dict:
        return {"zh_en": self.pairs["zh"].provenance(), "en_zh": self.pairs["en"].provenance(),
                "max_length": self.cfg.max_length, "decoding": "greedy",
                "libraries": library_versions("transformers", "sentencepiece")}
