"""Task-guided mixture of LoRA experts around a frozen Linear, as in X2Edit (`src/layers.py`).

                      ┌──────────── frozen base W ─────────────┐
    x ──┬─────────────┤                                        ├──(+)── y
        │             └────────────────────────────────────────┘   ▲
        ├── shared expert   up_s · down_s · x   (weight 1) ────────┤
        │                                                          │
        └── gate(concat(x, task)) → softmax over E → top-K ──┐     │
                 expert e:   up_e · down_e · x   × w_e(x) ───┴─────┘   (K of E per token)

    y = W x + s · ( up_s down_s x  +  Σ_{e ∈ topK} w_e · up_e down_e x ),   s = alpha / rank

One such layer replaces each adapted `nn.Linear`; the task embedding is owned by `MoELoRAAdapter` and
broadcast over the tokens of its sample. Facts from the reference code (reference-code.md §3.5):
  - each expert is a LoRA: down ~ Normal(std = 1/rank), up = 0, so a fresh adapter is the identity
    (LoRA, Hu et al. 2021, arXiv 2106.09685, §4.1; the 1/rank std is what X2Edit/diffusers'
    `LoRALinearLayer` uses);
  - the gate is a bias-free Linear on concat(token, task embedding) with nn.Linear's default init,
    kaiming_uniform(a=√5), i.e. U(±1/√fan_in); the top-K softmax weights are used as they are, NOT
    renormalised to sum to 1 (`norm_topk_prob=False`), and there is no load-balancing loss;
  - inputs are cast to the adapter's dtype (fp32 by default) and the update back to the input's dtype.

Shape suffixes (after torchtitan's moe.py): B batch, T tokens per sample, N = B·T tokens, I in features,
O out features, C task-embedding width, R rank, E routed experts, K experts per token, X = (E+1)·R
stacked expert ranks (shared first).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from manifests.taxonomy import NUM_TASK_IDS


@dataclass(frozen=True)
class MoELoRAConfig:
    rank: int = 64  # per expert; --rank 64 in train_512.sh / train_1024.sh
    alpha: float = 64.0  # --network_alpha 64 → scale alpha/rank = 1
    num_experts: int = 12  # routed experts; the shared expert comes on top
    top_k: int = 2
    num_tasks: int = NUM_TASK_IDS  # task-embedding rows; id 0 = other

    def __post_init__(self) -> None:
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be in 1..num_experts={self.num_experts}")


class MoELoRALinear(nn.Module):
    """`base(x)` plus the mixture of LoRA experts; `base` stays frozen and untouched.

    `task_BC` is a callable returning the current batch's task embedding (B, C); the adapter provides it, so
    the per-batch state lives in one place instead of being threaded through diffusers' attention code.
    """

    def __init__(self, base: nn.Linear, config: MoELoRAConfig, task_dim: int,
                 task_BC: Callable[[], torch.Tensor]):
        super().__init__()
        I, O, R, E = base.in_features, base.out_features, config.rank, config.num_experts
        self.base = base
        self.config = config
        self.task_BC = task_BC
        self.scale = config.alpha / config.rank
        device = base.weight.device  # `meta` when the base model was built without weights
        self.shared_down = nn.Parameter(torch.empty(R, I, device=device))
        self.shared_up = nn.Parameter(torch.zeros(O, R, device=device))
        self.experts_down = nn.Parameter(torch.empty(E, R, I, device=device))
        self.experts_up = nn.Parameter(torch.zeros(E, O, R, device=device))
        self.gate = nn.Parameter(torch.empty(E, I + task_dim, device=device))
        nn.init.normal_(self.shared_down, std=1 / R)
        nn.init.normal_(self.experts_down, std=1 / R)
        nn.init.kaiming_uniform_(self.gate, a=math.sqrt(5))
        self.expert_load_E: torch.Tensor | None = None  # share of routed (token, expert) pairs, last forward

    def forward(self, x_BTI: torch.Tensor) -> torch.Tensor:
        return self.base(x_BTI) + moe_lora_delta(self, x_BTI, self.task_BC())

    def extra_repr(self) -> str:
        c = self.config
        return f"rank={c.rank}, experts={c.num_experts}+1 shared, top_k={c.top_k}"


def route(layer: MoELoRALinear, logit_NE: torch.Tensor, task_BC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K routing from the token part of the gate logits, x @ G_xᵀ (N, E).

    The gate's concat(x, task) @ Gᵀ is split as x @ G_xᵀ + task @ G_taskᵀ, so the task part is computed
    once per sample, not once per token. Returns weight_NK (raw softmax probabilities) and expert_NK.
    """
    I, B = layer.base.in_features, task_BC.shape[0]
    logit_BTE = logit_NE.view(B, -1, logit_NE.shape[-1]) + F.linear(task_BC, layer.gate[:, I:])[:, None]
    return logit_BTE.softmax(-1).flatten(0, 1).topk(layer.config.top_k, dim=-1, sorted=False)


def moe_lora_delta(layer: MoELoRALinear, x_BTI: torch.Tensor, task_BC: torch.Tensor) -> torch.Tensor:
    """The adapter's update (without base(x)): every expert on every token, masked by the routing weights.

    One GEMM computes all (E+1)·R down projections and the gate's token logits; the routing weights (1 for
    the shared expert, the softmax probability for each of a token's top-K, 0 otherwise) scale the rank-R
    blocks; one GEMM does all up projections. An unselected expert has weight 0, so the output and every
    gradient equal the top-K definition exactly (moe_reference.py; the tests hold them to 1e-5).
    Why dense rather than token-sparse: it costs (E+1)/(K+1) ≈ 4.3× the FLOPs of a sparse dispatch, but a
    sparse one (tokens gathered into expert order, grouped GEMMs, outputs summed back) moves K copies of
    every I- and O-wide row forward and backward, and those memory-bound gathers outweigh its GEMMs: on an
    H100 in bf16 at the paper's micro-batches (30-35k tokens) dense takes 2.6 ms per site fwd+bwd and
    sparse 4.9-5.3 (bench/moe_dispatch.py, which runs both). Dense also keeps shapes static (no host sync,
    no data-dependent sizes: CUDA graphs and torch.compile work) and saves an (N, (E+1)·R) activation for
    backward instead of K copies of x. On CPU sparse is faster at width 3072; the CPU trains tiny models only.
    """
    B, T, I = x_BTI.shape
    if task_BC.shape[0] != B:
        raise ValueError(f"task embedding batch {task_BC.shape[0]} != input batch {B}")
    E, R, N = layer.config.num_experts, layer.config.rank, B * T
    x_NI = x_BTI.reshape(N, I).to(layer.gate.dtype)
    # One GEMM: all down projections (X = (E+1)·R columns), the gate's token logits, and zero rows that pad
    # the output's rows to a multiple of 8 elements: 16-byte-aligned rows keep cuBLAS on its fast kernels
    # in bf16 (25 % faster fwd+bwd on an H100 than the unpadded 844 columns or a separate gate GEMM).
    pad = (-((E + 1) * R + E)) % 8
    down_XI = torch.cat([layer.shared_down, layer.experts_down.flatten(0, 1), layer.gate[:, :I],
                         layer.gate.new_zeros(pad, I)])
    h_NX, logit_NE, _ = F.linear(x_NI, down_XI).split([(E + 1) * R, E, pad], dim=-1)
    weight_NK, expert_NK = route(layer, logit_NE, task_BC.to(layer.gate.dtype))

    # Under autocast the GEMM gives bf16 logits while routing may return fp32 weights: scatter in their dtype.
    routed_NE = torch.zeros_like(logit_NE, dtype=weight_NK.dtype).scatter(1, expert_NK, weight_NK)
    block_weight_NE1 = torch.cat([torch.ones_like(logit_NE[:, :1]), routed_NE], dim=1) * layer.scale
    h_NX = (h_NX.view(N, E + 1, R) * block_weight_NE1[..., None]).flatten(1)
    up_OX = torch.cat([layer.shared_up, layer.experts_up.permute(1, 0, 2).flatten(1)], dim=1)
    out_NO = F.linear(h_NX, up_OX)

    with torch.no_grad():
        layer.expert_load_E = torch.bincount(expert_NK.flatten(), minlength=E) / expert_NK.numel()
    return out_NO.view(B, T, -1).to(x_BTI.dtype)


class MoELoRAAdapter(nn.Module):
    """The task embedding shared by every MoE-LoRA site, and an index of the sites.

    It is registered on the transformer (`transformer.moe_lora`), so moving, casting or wrapping the
    transformer (DDP/FSDP/ZeRO) covers it. The experts live inside their blocks (so per-block sharding
    keeps them with their base weights) and are indexed here in a plain dict, not registered twice; yet
    `adapter.parameters()`, `named_parameters()` and `.to()` cover them as well as the task embedding
    (never the frozen base weights), so the adapter behaves as the one module it is. Parameter names are
    the export names: `task_embedding.weight`, `<site>.<param>`.

        with adapter.task(task_ids_B):      # embeds the batch's task ids once
            loss = loss_fn(transformer(...))
            loss.backward()                 # inside too: gradient checkpointing re-runs the sites
    """

    def __init__(self, config: MoELoRAConfig, task_dim: int, device: torch.device | str | None = None):
        super().__init__()
        self.config = config
        self.task_embedding = nn.Embedding(config.num_tasks, task_dim, device=device)  # N(0,1) as reference
        self.sites: dict[str, MoELoRALinear] = {}
        self._task_ids_B: torch.Tensor | None = None
        self._task_BC: torch.Tensor | None = None
        self.hook = None  # the transformer's pre-forward hook running `embed_task`, set by install_moe_lora

    @contextmanager
    def task(self, task_ids_B: torch.Tensor) -> Iterator[None]:
        if self._task_ids_B is not None:
            raise RuntimeError("adapter.task(...) scopes do not nest")
        self._task_ids_B = task_ids_B.to(self.task_embedding.weight.device)
        try:
            yield
        finally:
            self._task_ids_B = self._task_BC = None

    def embed_task(self, *_) -> None:
        """Forward pre-hook on the transformer (install_moe_lora): looks the batch's task embedding up once per
        scope, inside the transformer's forward, where FSDP has gathered the embedding's weight, and before the
        first block, so a gradient-checkpointed block's recompute repeats exactly the ops of its forward."""
        if self._task_ids_B is not None:
            self.current_task()

    def current_task(self) -> torch.Tensor:
        if self._task_ids_B is None:
            raise RuntimeError("MoE-LoRA needs the batch's task ids: run the transformer (and, with gradient "
                               "checkpointing, the backward pass) inside `with adapter.task(task_ids):`")
        if self._task_BC is None:
            self._task_BC = self.task_embedding(self._task_ids_B)
        return self._task_BC

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True,
                         ) -> Iterator[tuple[str, nn.Parameter]]:
        yield from super().named_parameters(prefix, recurse, remove_duplicate)
        if recurse:  # module-by-module walks (recurse=False) still see each tensor once, at its block
            for site, layer in self.sites.items():  # the site's own tensors (recurse=False), not its base
                yield from layer.named_parameters(f"{prefix}.{site}" if prefix else site, recurse=False,
                                                  remove_duplicate=remove_duplicate)

    def named_adapter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Every adapter tensor under its export name (what adapter_io writes and reads)."""
        return self.named_parameters()

    def _apply(self, fn, recurse=True):
        for layer in self.sites.values():
            layer._apply(fn, recurse=False)
        return super()._apply(fn, recurse)

    def expert_load(self) -> dict[str, torch.Tensor]:
        """Per site, the share of routed (token, expert) pairs each expert got in the last forward."""
        return {site: layer.expert_load_E for site, layer in self.sites.items() if layer.expert_load_E is not None}
