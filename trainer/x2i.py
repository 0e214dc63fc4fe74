"""X2I text conditioning: Qwen2.5-VL hidden states of every layer → AlignNet → FLUX's text inputs.

The paper's route (reference-code.md §3.3, `src/proj.py` `Proj7Exp` with use_cnn): the instruction alone, in
the chat template of one user message, left-padded to `max_length`, goes through the frozen MLLM once; the
prefill's hidden states of the embedding layer and of every decoder layer are stacked, (B, N, L, H) with
N = layers + 1 (29 on Qwen2.5-VL-7B), and AlignNet turns them into the 4096-d context that replaces T5 and
the 768-d pooled vector that replaces CLIP's. The text position ids are zeros, as for T5.

AlignNet parameter names are the reference's own, so its `diffusion_pytorch_model.bin` /
HF `OPPOer/X2I` `qwen2.5-vl-7b_proj.pt` load as they are (a DDP `module.` prefix is stripped):
    conv.weight (1, N, 5, 5), conv.bias (1,)                 the layer fusion
    mlp.layernorm.weight (H,), mlp.layernorm.bias (H,)       eps 1e-6 (create_proj3_qwen7b's norm_eps)
    mlp.projector.0.weight (D, H), mlp.projector.2.weight (D, D)   no bias; D = joint_attention_dim
    mlp.fc.1.weight (P, D), mlp.fc.1.bias (P,)               P = pooled_projection_dim
The reference returns (pooled, prompt); `AlignNet.forward` returns (prompt, pooled).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from trainer.model import TextEmbeds

ALIGNNET_NAME = "alignnet.safetensors"
ALIGNNET_FORMAT = "x2edit-alignnet"


class AlignNet(nn.Module):
    """(B, N, L, H) stacked MLLM hidden states → prompt embeds (B, L, D) and pooled embeds (B, P)."""

    def __init__(self, n_layers: int, mllm_dim: int, joint_dim: int = 4096, pooled_dim: int = 768,
                 kernel_size: int = 5):
        super().__init__()
        # The N layers are the conv's input channels; the 5×5 kernel also mixes neighbouring tokens/features.
        self.conv = nn.Conv2d(n_layers, 1, kernel_size, padding=(kernel_size - 1) // 2)
        # A ModuleDict keeps the reference's `mlp.<name>` parameter names without a class of its own.
        self.mlp = nn.ModuleDict({
            "layernorm": nn.LayerNorm(mllm_dim, eps=1e-6),
            "projector": nn.Sequential(nn.Linear(mllm_dim, joint_dim, bias=False), nn.GELU(),
                                       nn.Linear(joint_dim, joint_dim, bias=False)),
            "fc": nn.Sequential(nn.GELU(), nn.Linear(joint_dim, pooled_dim)),
        })

    def forward(self, hidden_BNLH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fused_BLH = self.conv(hidden_BNLH.to(self.conv.weight.dtype)).squeeze(1)
        prompt_BLD = self.mlp["projector"](self.mlp["layernorm"](fused_BLH))
        pooled_BP = self.mlp["fc"](prompt_BLD).mean(dim=1)  # padding tokens included, as in the reference
        return prompt_BLD, pooled_BP


def read_alignnet_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file, or a `torch.save`d state dict (the reference's `.bin` / `.pt`), `module.` stripped."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_alignnet(net: AlignNet, path: str | Path) -> None:
    """Fill `net` from `path`; any missing/unexpected key or shape mismatch is a ValueError naming it."""
    state, own = read_alignnet_state(path), net.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"{path}: not an AlignNet state dict: missing keys {missing}, unexpected keys "
                         f"{unexpected[:8]}; expected {sorted(own)}")
    for name, tensor in state.items():
        if tensor.shape != own[name].shape:
            raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, this MLLM/FLUX pair needs "
                             f"{tuple(own[name].shape)}")
    net.load_state_dict(state)


def save_alignnet(net: AlignNet, path: str | Path, mllm: str, write: bool = True) -> Path:
    """Reference parameter names, fp32; the MLLM it was trained against goes into the metadata. A sharded
    AlignNet is gathered: every process calls this, and only the one with `write` writes."""
    from safetensors.torch import save_file

    from trainer.distributed import full_tensor

    path = Path(path)
    tensors = {k: full_tensor(v.detach()) for k, v in net.state_dict().items()}
    if not write:
        return path
    tensors = {k: v.to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": ALIGNNET_FORMAT, "mllm": mllm})
    return path


def alignnet_mllm(path: str | Path) -> str | None:
    """The MLLM recorded in a saved `alignnet.safetensors`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("mllm")


class X2ITextEncoder:
    """Callable `prompts → TextEmbeds`, a drop-in for FLUX's CLIP + T5 in `EditModel(text_encoder=...)`.

    The MLLM is frozen and runs without gradients. AlignNet is frozen too unless `trainable` (the reference's
    512-px stage trains it, the 1024-px stage does not); a trainable one is kept in fp32, like the adapter.
    `forward_alignnet` is what gets called: AlignNet itself, or its DDP wrapper when trained on several
    processes."""

    def __init__(self, mllm_path: str, alignnet_path: str | Path | None, max_length: int, *, joint_dim: int,
                 pooled_dim: int, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 trainable: bool = False):
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

        self.max_length, self.trainable = max_length, trainable
        self.processor = AutoProcessor.from_pretrained(mllm_path, padding_side="left")
        self.mllm = Qwen2_5_VLForConditionalGeneration.from_pretrained(mllm_path, dtype=dtype)
        self.mllm.to(device).eval().requires_grad_(False)
        text = self.mllm.config.text_config
        self.alignnet = AlignNet(text.num_hidden_layers + 1, text.hidden_size, joint_dim, pooled_dim)
        if alignnet_path is not None:
            load_alignnet(self.alignnet, alignnet_path)
        self.alignnet.to(device, torch.float32 if trainable else dtype).requires_grad_(trainable)
        self.forward_alignnet: nn.Module = self.alignnet

    @torch.no_grad()
    def hidden_states(self, prompts: list[str]) -> torch.Tensor:
        """(B, layers + 1, max_length, H). The reference calls `generate(max_new_tokens=1,
        output_hidden_states=True)` and keeps `hidden_states[0]`, the prefill; one forward computes the same
        tensors without the sampling step and the KV cache, and `logits_to_keep=1` skips the (B, L, vocab)
        logits."""
        texts = [self.processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": p}]}],
                                                    tokenize=False, add_generation_prompt=True) for p in prompts]
        inputs = self.processor(text=texts, padding="max_length", max_length=self.max_length, truncation=True,
                                return_tensors="pt").to(self.mllm.device)
        out = self.mllm(**inputs, output_hidden_states=True, use_cache=False, logits_to_keep=1)
        return torch.stack(out.hidden_states, dim=1)

    def __call__(self, prompts: list[str]) -> TextEmbeds:
        hidden_BNLH = self.hidden_states(prompts)
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            prompt_BLD, pooled_BP = self.forward_alignnet(hidden_BNLH)
        ids_L3 = torch.zeros(prompt_BLD.shape[1], 3, device=prompt_BLD.device, dtype=prompt_BLD.dtype)
        return TextEmbeds(prompt_BLD, pooled_BP, ids_L3)
