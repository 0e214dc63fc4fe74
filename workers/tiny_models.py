"""Tiny random-weight checkpoints of the model workers' families, built offline at first use and saved with
`save_pretrained`, so tests and the CPU runs load them through the same `from_pretrained` path as a real
checkpoint. The parts come from the trainer's tiny models (trainer/tiny_flux.py): one builder for both.

    python -m workers.tiny_models            # builds them into $X2EDIT_TINY_MODELS (default: models/)
"""
from __future__ import annotations

import json
import os
import string
from pathlib import Path

import torch

from trainer.tiny_flux import build_tiny_flux, clip_tokenizer, flux_components, publish, qwen25vl_parts
from workers.lama import LAMA_FILE
from workers.tiny_vision import build_tiny_dinov2, build_tiny_siglip_aesthetic
from workers.tiny_vlm import build_tiny_qwen25vl_vllm
from workers.tiny_vlm_trained import build_tiny_qwen25vl_instructor

TINY_MODELS_ENV = "X2EDIT_TINY_MODELS"
DEFAULT_DIR = Path(__file__).resolve().parents[1] / "models"  # gitignored


def tiny_models_dir() -> Path:
    return Path(os.environ.get(TINY_MODELS_ENV) or DEFAULT_DIR)


def build_tiny(name: str) -> Path:
    """The folder of the tiny model `name` (built on first use): what `tiny:<name>` in a recipe resolves to."""
    builders = {"flux": lambda: build_tiny_flux(tiny_models_dir() / "tiny-flux"),  # text-to-image sources
                "flux-kontext": build_tiny_kontext, "flux-fill": build_tiny_fill,
                "qwen-image-edit": build_tiny_qwen_image_edit,
                "clip": build_tiny_clip, "grounding-dino": build_tiny_grounding_dino, "sam2": build_tiny_sam2,
                "lama": build_tiny_lama, "qwen2.5-vl": build_tiny_qwen25vl_chat, "marian": build_tiny_marian,
                "qwen2.5-vl-vllm": build_tiny_qwen25vl_vllm,  # wide enough for vLLM's CPU attention
                "qwen2.5-vl-instructor": build_tiny_qwen25vl_instructor,  # taught our prompts: writes instructions
                # the learned scorers' encoders (CLIP: "clip" above)
                "siglip-aesthetic": lambda: build_tiny_siglip_aesthetic(tiny_models_dir() / "tiny-siglip-aesthetic"),
                "dinov2": lambda: build_tiny_dinov2(tiny_models_dir() / "tiny-dinov2")}
    if name not in builders:
        raise ValueError(f"no tiny model {name!r}; there are: {', '.join(sorted(builders))}")
    return builders[name]()


def build_tiny_kontext(path: str | Path | None = None, seed: int = 0) -> Path:
    """A FluxKontextPipeline with FLUX.1's classes at widths of 32 (VAE ×2: a 64-px image is 256 tokens).
    Idempotent: an existing build is reused; a concurrent or killed build leaves no half folder."""
    path = Path(path) if path else tiny_models_dir() / "tiny-flux-kontext"
    if (path / "model_index.json").exists():
        return path
    from diffusers import FluxKontextPipeline

    return publish(path, FluxKontextPipeline(**flux_components(seed)))


def build_tiny_fill(path: str | Path | None = None, seed: int = 0) -> Path:
    """A FluxFillPipeline (FLUX.1-Fill's classes, the text-change editor's fill renderer): the tiny FLUX parts,
    the transformer widened as FLUX.1-Fill widens FLUX.1's (64 → 384 input channels): it reads the noisy latent,
    the masked image's latent and the mask folded to the latent grid, all 2×2-packed. Idempotent like
    `build_tiny_kontext`."""
    path = Path(path) if path else tiny_models_dir() / "tiny-flux-fill"
    if (path / "model_index.json").exists():
        return path
    from diffusers import FluxFillPipeline, FluxTransformer2DModel

    parts = flux_components(seed)
    vae = parts["vae"].config
    scale = 2 ** (len(vae.block_out_channels) - 1)  # the VAE's downsampling: a mask pixel block per latent pixel
    packed = 4 * vae.latent_channels
    # The private keys (e.g. `_use_default_values`) would make from_config ignore the channels set here.
    config = {k: v for k, v in parts["transformer"].config.items() if not k.startswith("_")}
    torch.manual_seed(seed)
    parts["transformer"] = FluxTransformer2DModel.from_config(
        {**config, "in_channels": 2 * packed + 4 * scale * scale, "out_channels": packed})
    return publish(path, FluxFillPipeline(**parts))


def build_tiny_qwen_image_edit(path: str | Path | None = None, seed: int = 0) -> Path:
    """A QwenImageEditPipeline: the tiny Qwen2.5-VL as text encoder, a 2-layer transformer, a ×8 VAE (the
    pipeline encodes its reference image at ~1 MP whatever the output size: ×8 keeps that to 4k tokens).
    Idempotent like `build_tiny_kontext`."""
    path = Path(path) if path else tiny_models_dir() / "tiny-qwen-image-edit"
    if (path / "model_index.json").exists():
        return path
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2VLProcessor

    text_encoder, vl_processor = qwen25vl_parts(seed)
    processor = Qwen2VLProcessor(image_processor=vl_processor.image_processor, tokenizer=vl_processor.tokenizer,
                                 video_processor=vl_processor.video_processor)  # the class the pipeline declares
    torch.manual_seed(seed)
    z = 4  # latent channels; the transformer sees them 2×2-packed
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=z, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                 temperal_downsample=[False, True, True], latents_mean=[0.0] * z,
                                 latents_std=[1.0] * z)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=4 * z, out_channels=z, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2,
                                              joint_attention_dim=text_encoder.config.text_config.hidden_size,
                                              axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                base_image_seq_len=256, max_image_seq_len=8192,
                                                time_shift_type="exponential")
    pipe = QwenImageEditPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                                 tokenizer=processor.tokenizer, processor=processor, transformer=transformer)
    return publish(path, pipe)


# Qwen's chat format with image parts written as Qwen2.5-VL's own template writes them: the processor expands each
# <|image_pad|> to the image's tokens. trainer/tiny_flux.py's template serves text encoders and drops image parts.
QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tiny_qwen25vl_chat(path: str | Path | None = None, seed: int = 0) -> Path:
    """trainer/tiny_flux.py's tiny Qwen2.5-VL with a chat template that places images, for the VLM worker
    (workers/vlm_transformers.py). Idempotent like `build_tiny_kontext`."""
    path = Path(path) if path else tiny_models_dir() / "tiny-qwen2.5-vl"
    if (path / "config.json").exists():
        return path
    model, processor = qwen25vl_parts(seed)
    processor.chat_template = QWEN_VL_CHAT_TEMPLATE
    return publish(path, model, processor)


# --- the expert removal chain (workers/expert_removal.py) ------------------------------------------------------

def build_tiny_clip(path: str | Path | None = None, seed: int = 0) -> Path:
    """A CLIPModel (32-px images, width 32) with its processor; the tokenizer is trainer/tiny_flux.py's
    byte-level BPE without merges, so every tag word tokenises (one token per character). Idempotent."""
    path = Path(path) if path else tiny_models_dir() / "tiny-clip"
    if (path / "config.json").exists():
        return path
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = clip_tokenizer()
    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1,
            "pad_token_id": 1}
    vision = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 2}
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    return publish(path, model, processor)


def build_tiny_grounding_dino(path: str | Path | None = None, seed: int = 0) -> Path:
    """A GroundingDinoForObjectDetection (Swin and BERT of widths 16-32, 3 queries) with its processor at 128 px
    (at 64 the coarsest feature level is 1×1, which its GroupNorm refuses). The BERT word pieces are the tag
    vocabulary's words plus single letters, so any caption tokenises; built with `BertTokenizer(vocab=...)` (the
    fast class ignores a vocab file, environment.md). Decoder layers >= 2: one fails to tie the box heads.
    Idempotent."""
    path = Path(path) if path else tiny_models_dir() / "tiny-grounding-dino"
    if (path / "config.json").exists():
        return path
    from transformers import (BertConfig, BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, SwinConfig)

    from workers.clip_tagger import load_vocabulary

    words = sorted({word for tag in load_vocabulary().tags for word in tag.en.lower().split()})
    letters = list(string.ascii_lowercase)
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","] + letters + [f"##{c}" for c in letters]
    pieces += [w for w in words if w not in pieces]
    tokenizer = BertTokenizer(vocab={piece: i for i, piece in enumerate(pieces)})
    swin = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                      window_size=4, out_features=["stage2", "stage3", "stage4"])
    bert = BertConfig(vocab_size=len(pieces), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64)
    # Three queries: random boxes each get a random SAM mask, and the union of few stays below the whole image.
    config = GroundingDinoConfig(backbone_config=swin, text_config=bert, d_model=32, encoder_layers=1,
                                 decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                 encoder_attention_heads=2, decoder_attention_heads=2, num_queries=3,
                                 max_text_len=32)
    torch.manual_seed(seed)
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 128, "longest_edge": 256}),
        tokenizer=tokenizer)
    return publish(path, GroundingDinoForObjectDetection(config), processor)


def build_tiny_sam2(path: str | Path | None = None, seed: int = 0) -> Path:
    """A transformers Sam2Model at 256 px (Hiera of widths 8-64, hidden 32) with its processor. A stage's first
    block pools its queries and needs a window, so the one global-attention block is a stage's second.
    Idempotent."""
    path = Path(path) if path else tiny_models_dir() / "tiny-sam2"
    if (path / "config.json").exists():
        return path
    from transformers import Sam2Config, Sam2ImageProcessor, Sam2Model, Sam2Processor

    side, hidden = 256, 32
    backbone = {"model_type": "sam2_hiera_det_model", "hidden_size": 8, "image_size": [side, side],
                "blocks_per_stage": [1, 1, 2, 1], "embed_dim_per_stage": [8, 16, 32, 64],
                "num_attention_heads_per_stage": [1, 1, 1, 1], "window_size_per_stage": [8, 4, 4, 4],
                "global_attention_blocks": [3], "window_positional_embedding_background_size": [4, 4]}
    # Feature maps after the ×4 patch embedding and each ×2 query pooling.
    vision = {"backbone_config": backbone, "backbone_channel_list": [64, 32, 16, 8], "fpn_hidden_size": hidden,
              "backbone_feature_sizes": [[side // 4, side // 4], [side // 8, side // 8], [side // 16, side // 16]]}
    config = Sam2Config(vision_config=vision,
                        prompt_encoder_config={"hidden_size": hidden, "image_size": side, "patch_size": 16},
                        mask_decoder_config={"hidden_size": hidden, "mlp_dim": 64, "num_attention_heads": 2,
                                             "iou_head_hidden_dim": 32})
    torch.manual_seed(seed)
    processor = Sam2Processor(image_processor=Sam2ImageProcessor(size={"height": side, "width": side}))
    return publish(path, Sam2Model(config), processor)


class TinyLama(torch.nn.Module):
    """big-lama's TorchScript interface: image (B, 3, H, W) in 0..1 and mask (B, 1, H, W) in {0, 1}, both with
    sides a multiple of 8, give the inpainted image (B, 3, H, W) in 0..1, equal to the input outside the mask.
    Two random convolutions over the masked image and the mask stand in for the FFC generator."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(4, 16, 3, padding=1), torch.nn.ReLU(),
                                       torch.nn.Conv2d(16, 3, 3, padding=1))

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        predicted = torch.sigmoid(self.net(torch.cat([image * (1 - mask), mask], dim=1)))
        return mask * predicted + (1 - mask) * image


class _TorchScript:
    """A module that `publish` saves as a TorchScript file named `name`."""

    def __init__(self, module: torch.nn.Module, name: str) -> None:
        self.module, self.name = module, name

    def save_pretrained(self, folder: Path) -> None:
        torch.jit.script(self.module).save(str(folder / self.name))


def build_tiny_lama(path: str | Path | None = None, seed: int = 0) -> Path:
    """A folder holding `big-lama.pt`: TinyLama, scripted. Idempotent."""
    path = Path(path) if path else tiny_models_dir() / "tiny-lama"
    if (path / LAMA_FILE).exists():
        return path
    torch.manual_seed(seed)
    return publish(path, _TorchScript(TinyLama().eval(), LAMA_FILE))


# --- the translation fallback (workers/translate.py) ------------------------------------------------------------

# The SentencePiece model's training text: instructions in both languages, so both scripts segment to known pieces.
MARIAN_CORPUS = ("Make the red car parked on the left dark blue.", "把停在左边的红色汽车改成深蓝色。",
                 "Turn the whole street into a watercolour painting with soft edges.", "把整条街道变成边缘柔和的水彩画。",
                 "Remove the person standing next to the door.", "移除站在门旁边的人。",
                 "Add a small white dog sitting on the grass.", "在草地上添加一只坐着的小白狗。")


def build_tiny_marian(path: str | Path | None = None, seed: int = 0) -> Path:
    """A MarianMTModel (width 32, one layer each side) with a MarianTokenizer: a character-level SentencePiece
    model trained here on `MARIAN_CORPUS` (one thread, so the same pieces every build) serves as both the source
    and the target spm, with a vocab.json in Marian's order (`</s>` 0, `<unk>` 1, `<pad>` last: opus-mt's
    decoder starts from `<pad>`). Idempotent like `build_tiny_kontext`."""
    path = Path(path) if path else tiny_models_dir() / "tiny-marian"
    if (path / "config.json").exists():
        return path
    import io
    import tempfile

    import sentencepiece
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    spm = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(MARIAN_CORPUS), model_writer=spm, model_type="char", vocab_size=len(
            set("".join(MARIAN_CORPUS))) + 3, character_coverage=1.0, num_threads=1, minloglevel=2,
        unk_id=0, bos_id=-1, eos_id=1, pad_id=-1, unk_piece="<unk>", eos_piece="</s>")
    processor = sentencepiece.SentencePieceProcessor(model_proto=spm.getvalue())
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    ordered = ["</s>", "<unk>"] + [p for p in pieces if p not in ("</s>", "<unk>")] + ["<pad>"]
    pad = len(ordered) - 1
    config = MarianConfig(vocab_size=len(ordered), d_model=32, encoder_layers=1, decoder_layers=1,
                          encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                          decoder_ffn_dim=64, max_position_embeddings=256, pad_token_id=pad, eos_token_id=0,
                          decoder_start_token_id=pad, forced_eos_token_id=0)
    torch.manual_seed(seed)
    model = MarianMTModel(config)
    # MarianTokenizer reads its spm and vocab from files, and its save_pretrained copies those files: the
    # folder lives until the build is published.
    with tempfile.TemporaryDirectory() as tmp:
        files = {name: str(Path(tmp) / name) for name in ("source.spm", "target.spm", "vocab.json")}
        for name in ("source.spm", "target.spm"):
            Path(files[name]).write_bytes(spm.getvalue())
        Path(files["vocab.json"]).write_text(json.dumps({p: i for i, p in enumerate(ordered)}, ensure_ascii=False))
        tokenizer = MarianTokenizer(files["source.spm"], files["target.spm"], files["vocab.json"],
                                    model_max_length=256)
        return publish(path, model, tokenizer)


if __name__ == "__main__":
    print(build_tiny_kontext())
    print(build_tiny_qwen_image_edit())
    for name in ("flux-fill", "clip", "grounding-dino", "sam2", "lama", "marian", "siglip-aesthetic", "dinov2"):
        print(build_tiny(name))
