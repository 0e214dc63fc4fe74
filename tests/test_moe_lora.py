"""MoE-LoRA adapter: fast dispatch = naive reference, placement on FLUX.1, task scoping, export/load."""
from __future__ import annotations

import json

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import FluxTransformer2DModel
from torch import nn

from trainer import (MoELoRAConfig, MoELoRALinear, get_adapter, install_moe_lora, load_adapter, moe_lora_delta,
                     read_adapter_config, remove_moe_lora, save_adapter, x2edit_sites)
from trainer.moe_lora import route
from trainer.moe_reference import moe_lora_delta_naive

TINY_FLUX = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                 axes_dims_rope=(4, 6, 6))
FLUX_DEV = dict(in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
TINY_ADAPTER = MoELoRAConfig(rank=8, alpha=16.0, num_experts=12, top_k=2)


def randomize(params, seed: int) -> None:
    """Non-zero up projections too (a fresh adapter is exactly zero, which would hide routing bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def layer_and_inputs(B=2, T=96, I=32, O=24, C=16, seed=0):
    torch.manual_seed(seed)
    task_BC = torch.randn(B, C, requires_grad=True)
    layer = MoELoRALinear(nn.Linear(I, O).requires_grad_(False), TINY_ADAPTER, C, lambda: task_BC)
    randomize([p for p in layer.parameters() if p.requires_grad], seed)
    return layer, torch.randn(B, T, I, requires_grad=True), task_BC


def grads_of(delta, layer, x, task):
    for t in (x, task, *layer.parameters()):
        t.grad = None
    out = delta(layer, x, task)
    # a loss that weighs every output column differently; per token, so that gradients are O(1) and a
    # 1e-5 tolerance means the same in every tensor
    ((out * torch.linspace(-1, 1, out.shape[-1])).sum() / out[..., 0].numel()).backward()
    return out.detach(), {"x": x.grad, "task": task.grad,
                          **{n: p.grad for n, p in layer.named_parameters() if p.requires_grad}}


def assert_fast_equals_naive(layer, x, task):
    out_fast, g_fast = grads_of(moe_lora_delta, layer, x, task)
    out_naive, g_naive = grads_of(moe_lora_delta_naive, layer, x, task)
    torch.testing.assert_close(out_fast, out_naive, atol=1e-5, rtol=1e-5)
    assert g_fast.keys() == g_naive.keys() == {"x", "task", "shared_down", "shared_up", "experts_down",
                                               "experts_up", "gate"}
    for name in g_fast:
        torch.testing.assert_close(g_fast[name], g_naive[name], atol=1e-5, rtol=1e-5, msg=name)


def test_fast_dispatch_equals_naive_reference_every_expert_used():
    layer, x, task = layer_and_inputs()
    assert_fast_equals_naive(layer, x, task)
    load = layer.expert_load_E
    assert (load > 0).all(), f"every expert must get tokens for this test to mean anything: {load}"
    assert load.sum().item() == pytest.approx(1.0)


def test_fast_dispatch_with_an_idle_expert():
    layer, x, task = layer_and_inputs(seed=1)
    with torch.no_grad():
        x[..., 0] = 1.0  # a constant feature, and expert 3 reads only it, with a large negative weight:
        layer.gate[3] = 0.0  # its logit is the lowest for every token, so it is never in the top 2
        layer.gate[3, 0] = -100.0
    assert_fast_equals_naive(layer, x, task)
    assert layer.expert_load_E[3] == 0
    assert layer.experts_down.grad[3].abs().max() == 0 and layer.experts_up.grad[3].abs().max() == 0


def test_dtype_in_dtype_out_and_top_k_weights_not_renormalised():
    layer, x, task = layer_and_inputs(B=1, T=8)
    layer.base.to(torch.bfloat16)  # a bf16 base model with the adapter kept in fp32, as the reference trains
    out = layer(x.detach().to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and layer.experts_up.dtype == torch.float32
    with torch.no_grad():
        weight_NK, expert_NK = route(layer, x[0] @ layer.gate[:, :32].T, task)
        prob_NE = (torch.cat([x[0], task.expand(8, -1)], -1) @ layer.gate.T).softmax(-1)
    torch.testing.assert_close(weight_NK, prob_NE.gather(1, expert_NK))
    torch.testing.assert_close(weight_NK.sort(-1).values, prob_NE.topk(2).values.sort(-1).values)
    assert (weight_NK.sum(-1) < 0.99).all()  # raw softmax probabilities of 12 experts, as the reference


def test_config_rejects_top_k_above_experts():
    with pytest.raises(ValueError, match="top_k"):
        MoELoRAConfig(num_experts=2, top_k=3)


# ---- placement on FLUX.1 ----------------------------------------------------------------------------------

def test_flux_dev_adapter_size_on_meta_device():
    with init_empty_weights():
        transformer = FluxTransformer2DModel(**FLUX_DEV)
    assert sum(p.numel() for p in transformer.parameters()) == 11_901_408_320
    adapter = install_moe_lora(transformer)
    assert len(adapter.sites) == 190 and adapter.sites.keys() == set(x2edit_sites(transformer))
    sizes = {name: p.numel() for name, p in adapter.named_adapter_parameters()}
    assert sizes.pop("task_embedding.weight") == 49_152 == 16 * 3072
    assert sum(sizes.values()) == 985_251_840  # 190 × (13 experts × 64 × 6144 + gate 12 × 6144)
    assert round(100 * sum(sizes.values()) / 11_901_408_320, 2) == 8.28
    trainable = sum(p.numel() for p in transformer.parameters() if p.requires_grad)
    assert trainable == 985_251_840 + 49_152
    assert sum(p.numel() for p in transformer.parameters()) == 11_901_408_320 + trainable


def tiny_flux(seed=0, **overrides) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(**{**TINY_FLUX, **overrides}).eval()


def flux_inputs(B=2, S_img=16, S_txt=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    side = int(S_img ** 0.5)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()  # (0, y, x)
    return dict(hidden_states=torch.randn(B, S_img, 16, generator=g),
                encoder_hidden_states=torch.randn(B, S_txt, 32, generator=g),
                pooled_projections=torch.randn(B, 32, generator=g), timestep=torch.rand(B, generator=g),
                guidance=torch.ones(B), img_ids=img_ids, txt_ids=torch.zeros(S_txt, 3), return_dict=False)


def test_placement_on_tiny_flux_image_stream_only_and_frozen_base():
    transformer = tiny_flux()
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    reference_out = transformer(**flux_inputs())[0]
    adapter = install_moe_lora(transformer, TINY_ADAPTER)

    assert list(adapter.sites) == [
        "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
        "transformer_blocks.0.attn.to_out.0", "single_transformer_blocks.0.attn.to_q",
        "single_transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.attn.to_v"]
    attn = transformer.transformer_blocks[0].attn
    assert isinstance(attn.to_q, MoELoRALinear) and type(attn.add_q_proj) is nn.Linear  # text stream untouched
    assert type(attn.to_add_out) is nn.Linear and type(transformer.single_transformer_blocks[0].proj_out) is nn.Linear
    assert adapter.task_embedding.weight.shape == (16, 32)  # the model's inner width
    trainable = {n for n, p in transformer.named_parameters() if p.requires_grad}
    own = {f"{s}.{p}" for s in adapter.sites for p in ("shared_down", "shared_up", "experts_down", "experts_up",
                                                        "gate")}
    assert trainable == own | {"moe_lora.task_embedding.weight"}
    assert {n for n, _ in adapter.named_parameters()} == own | {"task_embedding.weight"}  # the export names
    assert sum(p.numel() for p in adapter.parameters()) == sum(p.numel() for p in transformer.parameters()
                                                               if p.requires_grad)

    with adapter.task(torch.tensor([0, 5])):  # a fresh adapter (up = 0) leaves the model's output unchanged
        torch.testing.assert_close(transformer(**flux_inputs())[0], reference_out)
    with pytest.raises(RuntimeError, match="adapter.task"):
        transformer(**flux_inputs())  # no task ids set: a clear error, not a silent default

    assert len(adapter.expert_load()) == 7
    assert all(load.sum().item() == pytest.approx(1.0) for load in adapter.expert_load().values())

    adapter.to(torch.float64)  # .to() reaches the experts in their blocks, never the frozen base weights
    assert {p.dtype for p in adapter.parameters()} == {torch.float64}
    assert attn.to_q.shared_up.dtype == torch.float64 and attn.to_q.base.weight.dtype == torch.float32

    remove_moe_lora(transformer)
    assert get_adapter(transformer) is None and type(transformer.transformer_blocks[0].attn.to_q) is nn.Linear
    after = transformer.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_task_scope_is_cleared_and_does_not_nest():
    transformer = tiny_flux()
    adapter = install_moe_lora(transformer, TINY_ADAPTER)
    with adapter.task(torch.tensor([1])):
        assert adapter.current_task().shape == (1, 32)
        with pytest.raises(RuntimeError, match="nest"), adapter.task(torch.tensor([2])):
            raise AssertionError("a nested task scope was entered")
    with pytest.raises(RuntimeError, match="adapter.task"):
        adapter.current_task()
    with pytest.raises(ValueError, match="already has"):
        install_moe_lora(transformer)


def test_gradient_checkpointing_recomputes_inside_the_task_scope():
    grads = []
    for checkpointing in (False, True):
        transformer = tiny_flux()
        adapter = install_moe_lora(transformer, TINY_ADAPTER)
        randomize([p for _, p in adapter.named_adapter_parameters()], seed=3)
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        transformer.train()
        with adapter.task(torch.tensor([2, 7])):
            transformer(**flux_inputs())[0].square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in adapter.named_adapter_parameters()})
    assert grads[0]["task_embedding.weight"][[2, 7]].abs().min() > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


# ---- export / load ----------------------------------------------------------------------------------------

def test_save_and_load_round_trip(tmp_path):
    transformer = tiny_flux()
    adapter = install_moe_lora(transformer, TINY_ADAPTER)
    randomize([p for _, p in adapter.named_adapter_parameters()], seed=5)
    task_ids = torch.tensor([3, 0])
    with torch.no_grad(), adapter.task(task_ids):
        expected = transformer(**flux_inputs())[0]
    save_adapter(transformer, tmp_path, base_model_id="tiny/flux-test")

    config = read_adapter_config(tmp_path)
    assert config == {"format": "x2edit-moe-lora", "format_version": 1, "base_model_id": "tiny/flux-test",
                      "rank": 8, "alpha": 16.0, "num_experts": 12, "top_k": 2, "num_tasks": 16, "task_dim": 32,
                      "sites": list(adapter.sites)}
    assert json.loads((tmp_path / "adapter_config.json").read_text()) == config

    fresh = tiny_flux()  # same base weights (same seed), no adapter
    loaded = load_adapter(fresh, tmp_path)
    for (name, a), (name_b, b) in zip(adapter.named_adapter_parameters(), loaded.named_adapter_parameters()):
        assert name == name_b and torch.equal(a, b)
    with torch.no_grad(), loaded.task(task_ids):
        torch.testing.assert_close(fresh(**flux_inputs())[0], expected)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in transformer.named_parameters() if p.requires_grad}


def test_load_rejects_a_mismatching_transformer_and_leaves_it_untouched(tmp_path):
    transformer = tiny_flux(num_layers=2)
    install_moe_lora(transformer, TINY_ADAPTER)
    save_adapter(transformer, tmp_path, base_model_id="tiny/flux-2-layers")

    wider = tiny_flux(num_attention_heads=4)  # inner width 64, not 32
    with pytest.raises(ValueError, match="task_embedding.weight.*32"):
        load_adapter(wider, tmp_path)
    shallower = tiny_flux(num_layers=1)
    with pytest.raises(ValueError, match="transformer_blocks.1.attn.to_q"):
        load_adapter(shallower, tmp_path)
    assert get_adapter(shallower) is None and type(shallower.transformer_blocks[0].attn.to_q) is nn.Linear

    other_width_site = tiny_flux(num_layers=2)
    other_width_site.transformer_blocks[1].attn.to_out[0] = nn.Linear(32, 40)
    with pytest.raises(ValueError, match=r"transformer_blocks\.1\.attn\.to_out\.0\.(experts|shared)_up"):
        load_adapter(other_width_site, tmp_path)
    assert get_adapter(other_width_site) is None
    assert type(other_width_site.transformer_blocks[0].attn.to_q) is nn.Linear


def test_runs_under_bf16_autocast():
    """Under autocast the fused GEMM yields bf16 logits while the routing weights may be fp32 (found on an
    H200 with the full-size step)."""
    base = nn.Linear(32, 32).requires_grad_(False)
    task_BC = torch.randn(2, 32)
    layer = MoELoRALinear(base, MoELoRAConfig(rank=8, num_experts=4), 32, lambda: task_BC)
    x_BTI = torch.randn(2, 10, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_BTO = layer(x_BTI)
    y_BTO.float().sum().backward()
    assert x_BTI.grad is not None and torch.isfinite(x_BTI.grad).all()
