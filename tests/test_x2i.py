"""X2I text conditioning: AlignNet and its weight files, the Qwen2.5-VL encoder on a tiny model, training with it
(exact resume with a trained AlignNet) and editing with the exported adapter."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from trainer.config import TrainConfig  # noqa: E402
from trainer.tiny_flux import TEXT_DIM, build_tiny_flux, build_tiny_qwen25vl, write_random_corpus  # noqa: E402
from trainer.x2i import ALIGNNET_NAME, AlignNet, X2ITextEncoder, load_alignnet, save_alignnet  # noqa: E402

REFERENCE_KEYS = {"conv.weight", "conv.bias", "mlp.layernorm.weight", "mlp.layernorm.bias", "mlp.projector.0.weight",
                  "mlp.projector.2.weight", "mlp.fc.1.weight", "mlp.fc.1.bias"}  # src/proj.py Proj7Exp, use_cnn


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("x2i")
    write_random_corpus(root / "corpus-000000.tar")
    return {"root": root, "base": str(build_tiny_flux(root / "tiny-flux")), "data": [str(root / "*.tar")],
            "mllm": str(build_tiny_qwen25vl(root / "tiny-qwen"))}


def test_alignnet_shapes_and_reference_parameter_names():
    net = AlignNet(n_layers=3, mllm_dim=64, joint_dim=32, pooled_dim=24)
    prompt_BLD, pooled_BP = net(torch.randn(2, 3, 7, 64))
    assert prompt_BLD.shape == (2, 7, 32) and pooled_BP.shape == (2, 24)
    assert set(net.state_dict()) == REFERENCE_KEYS
    assert net.conv.weight.shape == (1, 3, 5, 5) and net.mlp["projector"][0].bias is None


def test_alignnet_loads_reference_and_own_files_and_names_mismatches(tmp_path):
    trained = AlignNet(3, 64, 32, 24)
    # The reference's checkpoint: torch.save of the (possibly DDP-wrapped, so `module.`-prefixed) state dict.
    torch.save({f"module.{k}": v for k, v in trained.state_dict().items()}, tmp_path / "diffusion_pytorch_model.bin")
    save_alignnet(trained, tmp_path / ALIGNNET_NAME, mllm="tiny")
    for name in ("diffusion_pytorch_model.bin", ALIGNNET_NAME):
        fresh = AlignNet(3, 64, 32, 24)
        load_alignnet(fresh, tmp_path / name)
        assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), trained.state_dict().values()))
    with pytest.raises(ValueError, match=r"conv.weight has shape \(1, 3, 5, 5\).*needs \(1, 29, 5, 5\)"):
        load_alignnet(AlignNet(29, 64, 32, 24), tmp_path / ALIGNNET_NAME)  # e.g. 7B weights on another MLLM
    state = trained.state_dict()
    state["t5stack.weight"] = state.pop("mlp.fc.1.bias")
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"missing keys \['mlp.fc.1.bias'\], unexpected keys \['t5stack.weight'\]"):
        load_alignnet(AlignNet(3, 64, 32, 24), tmp_path / "other.pt")


def test_the_encoder_gives_flux_text_inputs_from_every_prefill_layer(setup):
    encoder = X2ITextEncoder(setup["mllm"], None, 20, joint_dim=TEXT_DIM, pooled_dim=TEXT_DIM)
    prompts = ["Remove the red object", "edit 3"]
    text = encoder(prompts)
    assert text.prompt_BLD.shape == (2, 20, TEXT_DIM) and text.pooled_BD.shape == (2, TEXT_DIM)
    assert torch.equal(text.ids_L3, torch.zeros(20, 3)) and not text.prompt_BLD.requires_grad  # frozen
    # The reference's route: generate one token and keep the prefill's hidden states. Same tensors, up to rounding.
    hidden_BNLH = encoder.hidden_states(prompts)
    processor = encoder.processor
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": p}]}],
                                           tokenize=False, add_generation_prompt=True) for p in prompts]
    inputs = processor(text=texts, padding="max_length", max_length=20, truncation=True, return_tensors="pt")
    assert inputs.attention_mask[1, 0] == 0  # left padding
    generated = encoder.mllm.generate(**inputs, max_new_tokens=1, do_sample=False, output_hidden_states=True,
                                      return_dict_in_generate=True)
    assert hidden_BNLH.shape == (2, 3, 20, 64)  # embedding layer + 2 decoder layers
    torch.testing.assert_close(hidden_BNLH, torch.stack(generated.hidden_states[0], dim=1), atol=1e-5, rtol=1e-5)


def _cfg(setup, out: str, steps: int, trainable: bool) -> TrainConfig:
    return TrainConfig(base=setup["base"], data=setup["data"], out_dir=str(setup["root"] / out), resolution=32,
                       steps=steps, adapter={"rank": 8, "alpha": 8, "experts": 4, "top_k": 2}, checkpoint_every=2,
                       text_encoder="x2i", x2i={"mllm": setup["mllm"], "max_length": 16, "trainable": trainable})


def test_a_run_with_a_trained_alignnet_resumes_exactly(setup):
    import torch.distributed.checkpoint as dcp

    from trainer.train import train

    straight = train(_cfg(setup, "straight", 4, trainable=True))
    first = train(_cfg(setup, "resumed", 2, trainable=True))
    second = train(_cfg(setup, "resumed", 4, trainable=True))  # finds checkpoint-2: AlignNet and its Adam state
    assert [r["step"] for r in second] == [3, 4]
    assert first == straight[:2] and second == straight[2:]  # bitwise-equal losses on CPU
    exported = AlignNet(3, 64, TEXT_DIM, TEXT_DIM)
    load_alignnet(exported, setup["root"] / "straight" / "adapter" / ALIGNNET_NAME)  # after step 4
    at_step_2 = {"model": {f"alignnet.{k}": torch.empty_like(v) for k, v in exported.state_dict().items()}}
    dcp.load(at_step_2, checkpoint_id=str(setup["root"] / "straight" / "checkpoint-2"), no_dist=True)
    key = "mlp.projector.0.weight"
    assert not torch.equal(at_step_2["model"][f"alignnet.{key}"], exported.state_dict()[key])  # it trains


def test_a_frozen_alignnet_run_exports_an_adapter_the_edit_command_uses(setup, tmp_path):
    from trainer.edit import main
    from trainer.train import train

    history = train(_cfg(setup, "frozen", 2, trainable=False))
    assert [r["step"] for r in history] == [1, 2] and all(r["flow"] > 0 for r in history)
    adapter = setup["root"] / "frozen" / "adapter"
    assert (adapter / ALIGNNET_NAME).exists()
    Image.fromarray(np.full((40, 56, 3), 128, np.uint8)).save(tmp_path / "in.jpg")
    args = ["--adapter", str(adapter), "--image", str(tmp_path / "in.jpg"), "--instruction", "Remove the red object",
            "--out", str(tmp_path / "out.png"), "--resolution", "32", "--steps", "2", "--max-sequence-length", "16",
            "--device", "cpu"]
    with pytest.raises(ValueError, match="trained with X2I text conditioning.*pass --x2i-mllm"):
        main(args)
    main(args + ["--x2i-mllm", setup["mllm"]])
    assert Image.open(tmp_path / "out.png").size == (32, 32)
