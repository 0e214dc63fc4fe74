"""The VLM worker on transformers: Qwen2_5_VLForConditionalGeneration + its processor, batched `generate` with
left padding, the logits masked by xgrammar to each prompt's JSON schema (workers/vlm.py has the interface and
the parser; its docstring the recipe block).

Why xgrammar: it is the one structured-decoding library here that works with transformers 5 (lm-format-enforcer
0.11 does not import, `transformers.tokenization_utils` is gone; outlines brings its own model wrappers and a
heavier dependency tree), it is what vLLM uses by default (one grammar engine for both local backends), and a
mask costs microseconds per token. A grammar per row lets one batch mix prompts (a yes/no and a proposal).
Whitespace is not free (`any_whitespace=False`): a weak model otherwise spends its tokens on spaces. A mask
guarantees the shape, not an end: a string may run on to `max_new_tokens`, and that is `vlm_truncated`.

Decoding: greedy at temperature 0, or sampling with temperature, top_k and top_p; the rest of the checkpoint's
generation_config (e.g. Qwen2.5-VL's repetition_penalty 1.05) applies, as in the reference. A sampled batch draws
from one generator seeded from all its requests' seeds: reproducible for the same batch, not per request.
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from manifests.rejected import ItemFailed, Rejected
from workers.model_lifecycle import TransformersPair, library_versions, need, run_batched
from workers.vlm import TransformersVlmConfig, VlmAnswer, VlmRequest, to_answer

VERSION = "1"  # bumped when what the worker does around the model (prompt layout, decoding, parsing) changes


class TransformersVlm(TransformersPair):
    backend: ClassVar[str] = "transformers"
    model_class = "Qwen2_5_VLForConditionalGeneration"
    processor_class = "AutoProcessor"

    def __init__(self, cfg: TransformersVlmConfig) -> None:
        """Loads nothing."""
        super().__init__(cfg.model, cfg.revision, cfg.dtype)
        self.cfg = cfg

    def _load(self) -> tuple:
        model, processor = super()._load()
        if not self.cfg.constrained:
            return model, processor, None
        xgr = need("xgrammar")
        # The logits' width (the checkpoint pads its vocabulary past the tokenizer's), and generate()'s own stop
        # tokens, so that a grammar ends exactly where generation does.
        info = xgr.TokenizerInfo.from_huggingface(
            processor.tokenizer, vocab_size=model.get_output_embeddings().out_features,
            stop_token_ids=_ids(model.generation_config.eos_token_id))
        return model, processor, xgr.GrammarCompiler(info)  # it caches each schema's grammar

    def ask(self, requests: Sequence[VlmRequest]) -> list[VlmAnswer | Rejected | ItemFailed]:
        self.pair()  # a load error fails the batch here, not inside the OOM back-off
        return run_batched(self._generate, list(requests), self.cfg.batch_size)

    def _generate(self, batch: list[VlmRequest]) -> list[VlmAnswer | Rejected]:
        torch = need("torch")
        model, processor, compiler = self.pair()
        texts = [processor.apply_chat_template([_message(r)], add_generation_prompt=True, tokenize=False)
                 for r in batch]
        images = [image for r in batch for image in r.images]  # the processor takes them in the texts' order
        inputs = processor(text=texts, images=images or None, padding=True, padding_side="left",
                           return_tensors="pt").to(model.device)
        limit = max(r.max_new_tokens for r in batch)  # one generate(); each reply is cut to its own limit below
        sampling = {"do_sample": False}
        if self.cfg.temperature > 0:
            sampling = {"do_sample": True, "temperature": self.cfg.temperature, "top_k": self.cfg.top_k,
                        "top_p": self.cfg.top_p}
            torch.manual_seed(int(np.random.SeedSequence([r.seed for r in batch]).generate_state(1)[0]))
        masks = []
        if compiler is not None:
            grammars = [compiler.compile_json_schema(json.dumps(r.prompt.schema), any_whitespace=False)
                        if r.prompt.schema is not None else None for r in batch]
            masks = [_GrammarMask(grammars, model.get_output_embeddings().out_features)]
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=limit, logits_processor=masks, **sampling)
        seconds = (time.perf_counter() - start) / len(batch)
        stops = set(_ids(model.generation_config.eos_token_id))
        answers = []
        for request, row in zip(batch, out[:, inputs["input_ids"].shape[1]:].tolist()):
            row = row[:request.max_new_tokens]
            end = next((i for i, token in enumerate(row) if token in stops), None)
            raw = processor.tokenizer.decode(row[:end], skip_special_tokens=True)
            answers.append(to_answer(raw, request.prompt, truncated=end is None,
                                     tokens=len(row) if end is None else end + 1, seconds=seconds))
        return answers

    def provenance(self) -> dict:
        versions = library_versions("transformers", "torch", "xgrammar")
        return {"worker": "vlm", "backend": self.backend, "version": VERSION, **super().provenance(),
                "constrained": f"xgrammar {versions['xgrammar']}" if self.cfg.constrained else None,
                "temperature": self.cfg.temperature,
                **({"top_k": self.cfg.top_k, "top_p": self.cfg.top_p} if self.cfg.temperature > 0 else {}),
                "libraries": versions}


def _message(request: VlmRequest) -> dict:
    """One user turn: the images, then the text (the reference's qwenvl() layout)."""
    return {"role": "user", "content": [*({"type": "image"} for _ in request.images),
                                        {"type": "text", "text": request.prompt.text}]}


def _ids(value: int | list[int] | None) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


class _GrammarMask:
    """A transformers logits processor: each row's next-token logits masked by its own xgrammar matcher; a row
    without a grammar (a line-format prompt) is left free. Good for one generate() call: it learns the sampled
    tokens from input_ids, one step behind."""

    def __init__(self, grammars: list, vocab_size: int) -> None:
        xgr = need("xgrammar")
        self._xgr = xgr
        self.matchers = [xgr.GrammarMatcher(g) if g is not None else None for g in grammars]
        self.bitmask = xgr.allocate_token_bitmask(len(grammars), vocab_size)
        self.started = False

    def __call__(self, input_ids, scores):
        active = []
        for i, matcher in enumerate(self.matchers):
            if matcher is None or matcher.is_terminated():  # finished rows get pad tokens: nothing to accept
                continue
            if self.started and not matcher.accept_token(int(input_ids[i, -1])):
                raise RuntimeError(f"row {i}: the grammar refused the token it allowed ({int(input_ids[i, -1])})")
            if not matcher.is_terminated():
                matcher.fill_next_token_bitmask(self.bitmask, i)
                active.append(i)
        self.started = True
        if active:
            self._xgr.apply_token_bitmask_inplace(scores, self.bitmask.to(scores.device), indices=active)
        return scores
