"""A tiny random-weight Qwen2.5-VL that vLLM can serve on a CPU (`tiny:qwen2.5-vl-vllm`): vLLM's CPU attention
needs a head dim of at least 32, and the `tiny:qwen2.5-vl` of the transformers backend has 16. Same tokenizer,
processor and chat template (images placed as Qwen2.5-VL's own template places them), wider: text hidden 128
(4 heads of 32, 2 KV heads), vision hidden 64 (2 heads of 32) projecting to 128; ~0.65 M parameters, 2.6 MB.
`write_qwen25vl_folder` writes the same folder at any size without weights, for vLLM's `load_format="dummy"`
(bench/vlm_vllm_gpu.py: Qwen2.5-VL-7B's sizes).

    python -m workers.tiny_vlm        # builds it into $X2EDIT_TINY_MODELS (default: models/)
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from trainer.tiny_flux import QWEN_SPECIAL_TOKENS, publish, qwen25vl_parts

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# The M-RoPE sections (time, height, width) split the head's 16 frequency pairs. The longest prompt (every
# task's proposal, in Chinese) is ~7.6 k of this byte-level tokenizer's tokens.
TINY_TEXT = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 8192,
             "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}}
TINY_VISION = {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "out_hidden_size": 128,
               "fullatt_block_indexes": [1]}


def qwen25vl_config_and_processor(text: dict, vision: dict, pixels: dict | None = None, seed: int = 0,
                                  tokenizer: PreTrainedTokenizerBase | None = None) -> tuple:
    """A Qwen2_5_VLConfig of these sizes and the tiny processor (tokenizer, chat template that places images),
    its image processor bounded by `pixels` (min_pixels, max_pixels; None: Qwen2.5-VL's own bounds). The
    tokenizer is trainer/tiny_flux.py's unless one with Qwen's special tokens is given; the text config's
    vocab_size defaults to the tokenizer's."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    from workers.tiny_models import QWEN_VL_CHAT_TEMPLATE  # that module's registry imports this one

    tokenizer = tokenizer or qwen25vl_parts(seed)[1].tokenizer
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**(pixels or {})),
                                    video_processor=Qwen2VLVideoProcessor(**(pixels or {})), tokenizer=tokenizer,
                                    chat_template=QWEN_VL_CHAT_TEMPLATE)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    text = {"vocab_size": len(tokenizer), **text, "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"],
                              architectures=["Qwen2_5_VLForConditionalGeneration"])
    return config, processor


def build_tiny_qwen25vl_vllm(path: str | Path | None = None, seed: int = 0) -> Path:
    """Idempotent: an existing build is reused; a concurrent or killed build leaves no half folder."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from workers.tiny_models import tiny_models_dir

    path = Path(path) if path else tiny_models_dir() / "tiny-qwen2.5-vl-vllm"
    if (path / "config.json").exists():
        return path
    config, processor = qwen25vl_config_and_processor(TINY_TEXT, TINY_VISION,
                                                      {"min_pixels": 56 * 56, "max_pixels": 112 * 112}, seed)
    torch.manual_seed(seed)
    return publish(path, Qwen2_5_VLForConditionalGeneration(config), processor)


def write_qwen25vl_folder(path: str | Path, text: dict, vision: dict, pixels: dict | None = None) -> Path:
    """config.json and the processor files, no weights: what vLLM reads with load_format="dummy" (random weights
    of these sizes). Idempotent like `build_tiny_qwen25vl_vllm`."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    return publish(path, *qwen25vl_config_and_processor(text, vision, pixels))


if __name__ == "__main__":
    print(build_tiny_qwen25vl_vllm())
