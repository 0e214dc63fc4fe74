"""A tiny FLUX.1-architecture pipeline with random weights, built offline in the diffusers on-disk format.

Same classes as FLUX.1-dev (FluxTransformer2DModel, AutoencoderKL, CLIP + T5 text encoders and tokenizers,
FlowMatchEulerDiscreteScheduler), shrunk to widths of 32 so `make train` and the tests run on a laptop and
load through the very `from_pretrained` path a real checkpoint takes. The tokenizers are built from
character vocabularies (no download): CLIP's byte-level BPE with no merges, T5's unigram over characters.
`build_tiny_qwen25vl` does the same for the Qwen2.5-VL of the X2I text route (trainer/x2i.py).

    python -m trainer.tiny_flux models/tiny-flux
"""
from __future__ import annotations

import shutil
import string
import sys
import tempfile
from pathlib import Path

import torch

TEXT_DIM = 32


def publish(path: Path, *parts) -> Path:
    """`save_pretrained` every part into a fresh temporary folder beside `path`, then rename it: a killed build
    leaves no half model behind, and of two processes building at once (two actors on first use) the first
    rename wins and the other discards its copy."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".building-", dir=path.parent))
    for part in parts:
        part.save_pretrained(tmp)
    try:
        tmp.rename(path)
    except OSError:
        if not path.is_dir():  # not a lost race: a real error
            raise
        shutil.rmtree(tmp)
    return path


def clip_tokenizer():
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())  # the 256 byte symbols of a byte-level BPE
    specials = ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(specials + chars + [c + "</w>" for c in chars])}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer():
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(c, -2.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("▁" + c, -1.5) for c in string.ascii_letters + string.digits]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def flux_components(seed: int = 0, vae_scale_factor: int = 2) -> dict:
    """The parts of a FLUX.1 pipeline, tiny and random: pass them to FluxPipeline, FluxKontextPipeline, ….

    `vae_scale_factor` 8 is FLUX.1's (one latent pixel per 8×8): it keeps 1024-px images down to FLUX's token
    counts (~4k per image) where the default 2 would give 64k."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer()
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=TEXT_DIM, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                        projection_dim=TEXT_DIM, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=TEXT_DIM, d_kv=16, d_ff=64, num_layers=2,
                                 num_heads=2, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    blocks = vae_scale_factor.bit_length()  # a power of two: every block after the first halves the size
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        block_out_channels=(8,) + (16,) * (blocks - 1), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * blocks,
                        up_block_types=("UpDecoderBlock2D",) * blocks,
                        norm_num_groups=4, sample_size=64, scaling_factor=1.5, shift_factor=0.1)
    # in_channels = 4 latent channels × the 2×2 packing; head dim 16 = sum of the RoPE axes.
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=2,
                                         joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
                                         guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    return {"scheduler": scheduler, "vae": vae, "text_encoder": clip, "tokenizer": clip_tok, "text_encoder_2": t5,
            "tokenizer_2": t5_tok, "transformer": transformer}


def build_tiny_flux(path: str | Path, seed: int = 0, vae_scale_factor: int = 2) -> Path:
    """Write a tiny FluxPipeline to `path` (idempotent: an existing build is reused) and return the path."""
    path = Path(path)
    if (path / "model_index.json").exists():
        return path
    from diffusers import FluxPipeline

    return publish(path, FluxPipeline(**flux_components(seed, vae_scale_factor)))


QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>")
# Qwen's chat format for text-only messages (content a string or a list of {"type": "text"} parts).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _qwen_tokenizer():
    """A byte-level BPE with Qwen's special tokens, trained on a few sentences: any text tokenises."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    # Every byte is in the alphabet, so any instruction tokenises; the few merges come from these sentences.
    bpe.train_from_iterator(
        ["Remove the red object in the center of the image.", "Turn the photo into a watercolor painting.",
         "Add a small dog next to the chair.", "edit 0 1 2 3 4 5 6 7 8 9", "user assistant system"],
        trainers.BpeTrainer(vocab_size=400, special_tokens=list(QWEN_SPECIAL_TOKENS), show_progress=False,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    return tokenizer, {tok: bpe.token_to_id(tok) for tok in QWEN_SPECIAL_TOKENS}


def build_tiny_qwen2_lm(path: str | Path, seed: int = 0) -> Path:
    """A tiny Qwen2 causal LM with a chat template: the text-only classifier the reference uses Qwen3 for."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer, ids = _qwen_tokenizer()
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                                         pad_token_id=ids["<|endoftext|>"]))
    return publish(path, model, tokenizer)


def build_tiny_qwen25vl(path: str | Path, seed: int = 0) -> Path:
    """A ~200 k-parameter Qwen2.5-VL (text hidden 64, 2 layers, vision depth 2) with its processor, written
    with `save_pretrained` so `AutoProcessor` / `Qwen2_5_VLForConditionalGeneration.from_pretrained` load it.
    Idempotent like `build_tiny_flux`."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    return publish(path, *qwen25vl_parts(seed))


def qwen25vl_parts(seed: int = 0) -> tuple:
    """The tiny Qwen2.5-VL and its processor (also Qwen-Image-Edit's text encoder, workers/tiny_models.py)."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    tokenizer, ids = _qwen_tokenizer()
    pixels = {"min_pixels": 56 * 56, "max_pixels": 112 * 112}
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tokenizer,
                                    video_processor=Qwen2VLVideoProcessor(**pixels), chat_template=QWEN_CHAT_TEMPLATE)
    # head dim 64 / 4 = 16; the M-RoPE sections (time, height, width) split its 8 frequency pairs.
    text = {"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"]}
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
              "fullatt_block_indexes": [1]}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config), processor


if __name__ == "__main__":
    print(build_tiny_flux(sys.argv[1] if len(sys.argv) > 1 else "models/tiny-flux"))


def write_random_corpus(path: str | Path, pairs: int = 12, tasks: tuple[int, ...] = (3, 11, 12)) -> Path:
    """A corpus shard of random 64-px pairs, tasks taken in turn: training data for tests and benchmarks."""
    import io
    import json

    import numpy as np
    from PIL import Image

    from manifests.shards import tar_bytes

    def jpeg(seed: int) -> bytes:
        pixels = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).resize((64, 64)).save(out, "JPEG")
        return out.getvalue()

    members = []
    for i in range(pairs):
        key = f"pair-{i:05d}"
        meta = {"task_id": tasks[i % len(tasks)], "instruction_en": f"edit {i}"}
        members += [(f"{key}.json", json.dumps(meta).encode()), (f"{key}.src.jpg", jpeg(i)),
                    (f"{key}.edited.jpg", jpeg(100_000 + i))]
    path = Path(path)
    path.write_bytes(tar_bytes(members))
    return path
