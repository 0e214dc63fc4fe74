"""A tiny Qwen2.5-VL taught at build time to answer the instruction VLM's prompts (`tiny:qwen2.5-vl-instructor`),
so that the `tiny-models` recipe writes its instructions with the VLM instructor (workers/vlm_instructor.py) end to
end: proposal, self-reflection and language check, through the same from_pretrained and xgrammar path as a real
Qwen2.5-VL. A random-weight model cannot finish a free-text string inside the JSON schema, so every pair would end
`vlm_truncated`; this one can.

It is a test fixture. Its replies are memorised, not understood: whatever the image, the English proposal prompt
gets `INSTRUCTIONS` (one fixed instruction per task of the recipe's instruction-following editor, in the wording
of prompts/task_instructions.yaml's templates), and the English reflection prompt gets "keep" with the reviewed
task's instruction repeated. It has learnt nothing about images, and nothing of other tasks, other prompts or
the Chinese templates; what it writes for them is whatever the schema lets it ramble into.

How: the shapes of `tiny:qwen2.5-vl-vllm` (workers/tiny_vlm.py; 1.1 M parameters, 4.3 MB with this vocabulary),
a byte-level BPE of 2048 pieces trained on the prompt library itself (whole words: the proposal prompt is 1.2 k
tokens instead of the shared tiny tokenizer's 2.7 k, and attention, most of a step, grows with its square), and
`STEPS` AdamW steps on the six conversations, each step with a fresh random image per conversation (multi-scale
noise at a random size), so that the replies depend neither on the image nor on its token count. Seeded, on one
CPU thread: ~30 s on a busy core; training.json in the folder records the final loss and the time. The loss is
the replies' cross-entropy only; the replies are JSON as xgrammar's `any_whitespace=False` writes it, so greedy
decoding under the schema's mask follows the trained tokens. tests/test_tiny_vlm_trained.py checks the replies
on images of the tiny recipe, which training never showed it.

    python -m workers.tiny_vlm_trained    # builds it into $X2EDIT_TINY_MODELS (default: models/)
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from trainer.tiny_flux import QWEN_SPECIAL_TOKENS, publish
from workers.tiny_vlm import TINY_TEXT, TINY_VISION, qwen25vl_config_and_processor
from workers.vlm_prompts import LANGUAGES, NAMED_TASKS, render

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# The tasks `tiny-models` routes to its instruction-following editor (FLUX.1-Kontext), in taxonomy order.
INSTRUCTIONS: dict[str, dict[str, str]] = {
    "style_change": {"en": "Convert the image to a watercolor style", "zh": "将图片转换为水彩风格"},
    "background_change": {"en": "Replace the background with a sandy beach", "zh": "将背景替换为沙滩"},
    "material_change": {"en": "Make the main object look like it is made of wood", "zh": "让主体看起来是木头做的"},
    "tone_transformation": {"en": "Change the lighting to a warm evening light", "zh": "把光线改为温暖的傍晚光线"},
    "subject_driven": {"en": "Keep the same subject and show it on a beach at sunset",
                       "zh": "保持同一个主体，让它在日落时的海滩上"},
}
CRITIQUE = "Fine: it asks for a visible change of this task."
PIXELS = {"min_pixels": 56 * 56, "max_pixels": 112 * 112}  # 4 to 16 image tokens, as the other tiny VLMs
VOCAB = 2048
STEPS, LR = 100, 5e-3  # seeds 0-2: reply loss < 0.003 by step ~80, every reply right on unseen images


def conversations() -> list[tuple[str, str]]:
    """(prompt, reply) for the proposal over INSTRUCTIONS' tasks and the reflection of each instruction."""
    tasks = tuple(INSTRUCTIONS)
    proposal = {task: INSTRUCTIONS[task] for task in NAMED_TASKS if task in tasks}  # the schema's order
    out = [(render("propose", "en", tasks=tasks).text, _json(proposal))]
    for task, said in INSTRUCTIONS.items():
        reply = {"critique": CRITIQUE, "grounded": True, "feasible": True, "matches_task": True,
                 "changes_image": True, "languages_ok": True, "verdict": "keep",
                 "instruction_en": said["en"], "instruction_zh": said["zh"]}
        prompt = render("reflect", "en", task=task, instruction_en=said["en"], instruction_zh=said["zh"])
        out.append((prompt.text, _json(reply)))
    return out


def _json(value: dict) -> str:
    # xgrammar's JSON grammar without free whitespace writes ", " and ": ", as json.dumps does by default.
    return json.dumps(value, ensure_ascii=False)


def _tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text tokenises) with Qwen's special tokens, its merges learnt from every template in
    both languages and the replies."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [render("propose", lang).text for lang in LANGUAGES]
    corpus += [render("reflect", lang, task=task, instruction_en=said["en"], instruction_zh=said["zh"]).text
               for lang in LANGUAGES for task, said in INSTRUCTIONS.items()]
    corpus += [reply for _, reply in conversations()]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=list(QWEN_SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    return tokenizer


def _image(rng: np.random.Generator) -> np.ndarray:
    """Noise summed over scales (flat patches to fine grain, smooth or blocky) at a random size and tint: images
    unlike any source, so a test on real ones shows the replies do not depend on the image."""
    import cv2

    h, w = (int(side) for side in rng.integers(112, 448, 2))
    x = sum(cv2.resize(rng.normal(0, 1, (k, k, 3)).astype(np.float32), (w, h),
                       interpolation=(cv2.INTER_NEAREST, cv2.INTER_CUBIC)[int(rng.integers(2))]) * rng.uniform(0, 1)
            for k in (2, 4, 8, 16, 32, 64))
    x = (x - x.mean()) / (x.std() + 1e-6) * rng.uniform(10, 80) + rng.uniform(40, 215, 3)
    return np.clip(x, 0, 255).astype(np.uint8)


def _encode(processor, prompt: str, reply: str, image: np.ndarray) -> tuple[dict, torch.Tensor]:
    """The conversation as the VLM worker lays it out (image, then text; workers/vlm_transformers.py) with the
    reply and its end token appended, and the reply's token ids (the targets)."""
    message = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(message, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text + reply + "<|im_end|>"], images=[image], return_tensors="pt")
    targets = processor.tokenizer(reply + "<|im_end|>", return_tensors="pt")["input_ids"][0]
    # The reply's tokens are those generation will produce after the prompt: no merge across the boundary.
    assert torch.equal(inputs["input_ids"][0, -len(targets):], targets)
    return dict(inputs), targets


def train(seed: int = 0, steps: int = STEPS) -> tuple:
    """(model, processor, notes): the trained model and what the training did."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    start = time.perf_counter()
    config, processor = qwen25vl_config_and_processor(TINY_TEXT, TINY_VISION, PIXELS, seed, _tokenizer())
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, total_steps=steps, pct_start=0.1)
    rng, data = np.random.default_rng(seed), conversations()
    for _ in range(steps):
        losses = []
        for prompt, reply in data:
            inputs, targets = _encode(processor, prompt, reply, _image(rng))
            # Logits for the reply's positions only: the prompt's would cost a third of the step for nothing.
            logits = model(**inputs, logits_to_keep=len(targets) + 1).logits[0, :-1]
            loss = torch.nn.functional.cross_entropy(logits, targets)
            loss.backward()
            losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
    notes = {"seed": seed, "steps": steps, "lr": LR, "conversations": len(data),
             "final_reply_loss": round(float(np.mean(losses)), 5), "seconds": round(time.perf_counter() - start, 1)}
    return model.eval(), processor, notes


class _Notes:
    """training.json beside the weights: what the fixture was taught, and how long it took."""

    def __init__(self, notes: dict) -> None:
        self.notes = notes

    def save_pretrained(self, folder: Path) -> None:
        (folder / "training.json").write_text(json.dumps(self.notes, indent=1) + "\n")


def build_tiny_qwen25vl_instructor(path: str | Path | None = None, seed: int = 0) -> Path:
    """Idempotent: an existing build is reused; a concurrent or killed build leaves no half folder."""
    from workers.tiny_models import tiny_models_dir

    path = Path(path) if path else tiny_models_dir() / "tiny-qwen2.5-vl-instructor"
    if (path / "config.json").exists():
        return path
    # One thread: the sums in one order whatever the machine's core count (fewer ways for two builds to differ);
    # at this size more threads gain nothing, and on busy cores their synchronisation costs ten times the time.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, processor, notes = train(seed)
    finally:
        torch.set_num_threads(threads)
    return publish(path, model, processor, _Notes(notes))


if __name__ == "__main__":
    print(build_tiny_qwen25vl_instructor())
