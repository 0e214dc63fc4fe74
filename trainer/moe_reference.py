"""The MoE-LoRA update written for clarity: the definition, one expert at a time, as the reference code's
training forward does it. The tests hold `moe_lora.moe_lora_delta` to this; the bench times both.
Shape suffixes as in moe_lora.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.moe_lora import MoELoRALinear


def lora(x_NI: torch.Tensor, down_RI: torch.Tensor, up_OR: torch.Tensor) -> torch.Tensor:
    return F.linear(F.linear(x_NI, down_RI), up_OR)


def moe_lora_delta_naive(layer: MoELoRALinear, x_BTI: torch.Tensor, task_BC: torch.Tensor) -> torch.Tensor:
    B, T, I = x_BTI.shape
    in_dtype, x_BTI = x_BTI.dtype, x_BTI.to(layer.gate.dtype)
    task_BTC = task_BC.to(layer.gate.dtype)[:, None].expand(B, T, -1)
    prob_BTE = F.linear(torch.cat([x_BTI, task_BTC], dim=-1), layer.gate).softmax(dim=-1)
    weight_BTK, expert_BTK = prob_BTE.topk(layer.config.top_k, dim=-1)  # raw probabilities, not renormalised

    x_NI, weight_NK, expert_NK = x_BTI.reshape(B * T, I), weight_BTK.flatten(0, 1), expert_BTK.flatten(0, 1)
    out_NO = lora(x_NI, layer.shared_down, layer.shared_up)
    for e in range(layer.config.num_experts):
        token_n, slot_n = (expert_NK == e).nonzero(as_tuple=True)  # the tokens that picked expert e
        y_nO = lora(x_NI[token_n], layer.experts_down[e], layer.experts_up[e])
        out_NO = out_NO.index_add(0, token_n, weight_NK[token_n, slot_n, None] * y_nO)
    return (out_NO * layer.scale).view(B, T, -1).to(in_dtype)
