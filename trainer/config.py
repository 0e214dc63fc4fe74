"""Training recipes: YAML → typed config; unknown keys and bad values are errors naming the key and file."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from manifests.config import Strict


class AdapterConfig(Strict):
    rank: int = Field(64, ge=8)  # the reference: --rank 64 --network_alpha 64 --experts 12, top-2
    alpha: float = 64.0
    experts: int = Field(12, ge=1)
    top_k: int = Field(2, ge=1)


class ContrastiveConfig(Strict):
    weight: float = Field(0.2, ge=0)  # λ, paper eq. (9)
    tau: float = Field(0.5, gt=0)


class ValidationConfig(Strict):
    """A held-out flow-matching loss per task (trainer/validate.py), written to `val_log.jsonl`."""

    pairs_per_task: int = Field(2, ge=1)  # kept out of training, per task that can spare them
    every: int = Field(100, ge=1)  # steps; also after the last step
    sigmas: list[float] = Field([0.1, 0.3, 0.5, 0.7, 0.9], min_length=1)
    seed: int = 0

    @model_validator(mode="after")
    def _sigmas_in_range(self) -> ValidationConfig:
        if not all(0 < s < 1 for s in self.sigmas):
            raise ValueError(f"validation sigmas must lie in (0, 1), got {self.sigmas}")
        return self


class X2IConfig(Strict):
    """The paper's text conditioning (reference-code.md §3.3): Qwen2.5-VL hidden states → AlignNet."""

    mllm: str  # Qwen2.5-VL path or hub id (the reference: Qwen2.5-VL-7B-Instruct)
    alignnet: str | None = None  # AlignNet weights (.safetensors, or the reference's .bin/.pt); null = random init
    max_length: int = Field(512, ge=1)  # instruction tokens, chat template included (the reference: 512)
    trainable: bool = False  # the reference trains AlignNet at 512 px and freezes it at 1024 px


class TrainConfig(Strict):
    base: str  # diffusers FLUX.1 pipeline: a path or a hub id (FLUX.1-dev, Krea, Kontext, ...)
    build_tiny_base: bool = False  # build the tiny random-weight FLUX at `base` if it is missing (CPU demo)
    data: list[str]  # shard globs: corpus shards and/or reference-format X2Edit shards
    out_dir: str
    resolution: int = Field(512, ge=16)
    steps: int = Field(1000, ge=1)
    tasks_per_batch: int = Field(2, ge=1)  # P: the global batch is P tasks × K pairs
    pairs_per_task: int = Field(2, ge=2)  # K
    lr: float = 1e-4  # the reference: AdamW 1e-4, betas (0.9, 0.999), wd 1e-4, eps 1e-8, clip 1.0
    weight_decay: float = 1e-4
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float = 1.0
    timesteps: Literal["uniform", "logit_normal"] = "uniform"
    guidance: float = 1.0  # guidance-embedding value during training (the reference: 1)
    contrastive: ContrastiveConfig = ContrastiveConfig()
    adapter: AdapterConfig = AdapterConfig()
    # An exported adapter to start from, as the paper's 1024-px stage starts from its 512-px one; its rank,
    # alpha, experts and top_k must equal `adapter:`. A checkpoint in out_dir takes precedence (resume).
    init_adapter: str | None = None
    reference_layout: Literal["kontext", "row_offset"] = "kontext"
    max_sequence_length: int = Field(512, ge=1)  # T5 tokens (clip_t5)
    text_encoder: Literal["clip_t5", "x2i"] = "clip_t5"  # FLUX's own encoders, or the paper's X2I route
    x2i: X2IConfig | None = None
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    fsdp: bool = False  # shard base, adapter and optimizer states over the processes (FSDP2) instead of DDP
    checkpoint_every: int = Field(100, ge=1)
    validation: ValidationConfig | None = None  # off unless given
    keep_checkpoints: int = Field(2, ge=1)
    num_workers: int = Field(0, ge=0)
    seed: int = 0

    @model_validator(mode="after")
    def _x2i_block_matches_text_encoder(self) -> TrainConfig:
        if self.text_encoder == "x2i" and self.x2i is None:
            raise ValueError("text_encoder x2i needs an `x2i:` block with at least `mllm: <Qwen2.5-VL path>`")
        if self.text_encoder != "x2i" and self.x2i is not None:
            raise ValueError(f"an `x2i:` block is given but text_encoder is {self.text_encoder!r}; "
                             "set text_encoder: x2i or remove the block")
        return self


def load_train_config(path: str | Path, **overrides) -> TrainConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        return TrainConfig.model_validate({**data, **{k: v for k, v in overrides.items() if v is not None}})
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    except ValidationError as e:
        # Errors of the whole recipe (the x2i check) have an empty location.
        lines = [f"{path}: {'.'.join(map(str, err['loc'])) or '(recipe)'}: {err['msg']}" for err in e.errors()]
        raise ValueError("\n".join(lines)) from None
