"""The diffusers editor on a tiny random FLUX.1 Kontext built offline: it loads from a folder or the local hub
cache through from_pretrained, edits at the edit size and returns the source size, is deterministic per seed,
backs off on out-of-memory, and says what made the edits. Timings are printed (`-s`), never asserted."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from workers import diffusers_editor  # noqa: E402
from workers.base import EditOutput, EditRequest  # noqa: E402
from workers.diffusers_editor import DiffusersEditor, edit_size  # noqa: E402
from workers.model_lifecycle import ItemFailed, ModelNotFound, resolve_model, run_batched  # noqa: E402
from workers.tiny_models import build_tiny_kontext  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def kontext(tmp_path_factory) -> Path:
    return build_tiny_kontext(tmp_path_factory.mktemp("models") / "tiny-flux-kontext")


def config(model, **overrides) -> DiffusersEditor.Config:
    settings = dict(model=str(model), dtype="float32", steps=2, resolution=64, batch_size=4,
                    tasks=("style_change", "tone_transformation"), max_sequence_length=64)
    return DiffusersEditor.Config(**{**settings, **overrides})


def request(seed: int, instruction: str = "Turn the photo into a watercolor painting") -> EditRequest:
    return EditRequest(op="instruction", params={}, instruction_en=instruction, instruction_zh="", seed=seed,
                       subject=None)


def image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_tiny_kontext_edits_two_aspects_at_their_source_sizes_deterministically(kontext):
    editor = DiffusersEditor(config(kontext))
    assert editor.load_seconds is None  # construction loads nothing
    wide, tall = image(60, 80), image(90, 50, seed=1)
    images, requests = [wide, tall, wide], [request(1), request(1), request(2)]
    first = editor.edit(images, requests)
    first_s = editor.last_call_seconds
    again = editor.edit(images, requests)
    assert all(isinstance(out, EditOutput) for out in first + again)
    assert [out.edited.shape for out in first] == [(60, 80, 3), (90, 50, 3), (60, 80, 3)]
    assert all(out.source is img and out.mask is None and out.edited.dtype == np.uint8
               for out, img in zip(first, images))
    assert all(np.array_equal(a.edited, b.edited) for a, b in zip(first, again))  # same seed, same edit
    assert not np.array_equal(first[0].edited, first[2].edited)  # same image, another seed
    print(f"\ntiny Kontext: load {editor.load_seconds:.3f} s; 3 edits (2 sizes, 2 steps): first call "
          f"{first_s:.3f} s, second {editor.last_call_seconds:.3f} s")


def test_kontext_runs_at_the_edit_size_not_its_1_mp_default(kontext):
    """Kontext resizes to ~1 MP unless told not to (environment.md): count the tokens the transformer sees."""
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline.from_pretrained(kontext, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    tokens: list[int] = []
    pipe.transformer.register_forward_pre_hook(lambda _, args, kwargs: tokens.append(kwargs["hidden_states"].shape[1]),
                                               with_kwargs=True)
    editor = DiffusersEditor(config(kontext, resolution=128), pipeline=pipe)
    editor.edit([image(300, 400)], [request(0)])
    h, w = edit_size(400, 300, 128)
    assert (h, w) == (112, 144)  # 128² pixels at 4:3, multiples of 16
    per_image = (h // 4) * (w // 4)  # the tiny VAE's ×2, then 2×2 packing
    assert tokens == [2 * per_image] * 2  # target + reference tokens, 2 steps


def test_same_seed_gives_the_same_edit_alone_or_in_a_batch(kontext):
    editor = DiffusersEditor(config(kontext))
    alone = editor.edit([image(64, 64)], [request(7)])[0].edited
    batched = editor.edit([image(64, 64, seed=3), image(64, 64)], [request(1), request(7)])[1].edited
    assert np.abs(alone.astype(int) - batched.astype(int)).max() <= 1  # batched kernels may round differently


@pytest.mark.slow  # ~10 s on 2 cores: Qwen-Image-Edit encodes its reference at ~1 MP even here
def test_tiny_qwen_image_edit_runs_a_batch_with_true_cfg(tmp_path):
    from diffusers import QwenImageEditPipeline

    from workers.tiny_models import build_tiny_qwen_image_edit

    folder = build_tiny_qwen_image_edit(tmp_path / "tiny-qwen-image-edit")
    pipe = QwenImageEditPipeline.from_pretrained(folder, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    calls: list[int] = []
    pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    editor = DiffusersEditor(config(folder, pipeline="QwenImageEditPipeline", steps=1, guidance=2.0), pipeline=pipe)
    out = editor.edit([image(60, 80), image(60, 80, seed=1)], [request(0), request(1)])
    assert [o.edited.shape for o in out] == [(60, 80, 3)] * 2
    assert len(calls) == 2  # one step, with the negative prompt: guided and unguided passes
    print(f"\ntiny Qwen-Image-Edit: 2 edits, 1 step, {editor.last_call_seconds:.1f} s")


def test_buckets_mode_picks_the_reference_bucket():
    from trainer.data import bucket_for

    assert edit_size(1000, 1000, "buckets") == (1024, 1024)
    assert edit_size(1600, 900, "buckets") == (752, 1392)  # 16:9 → the reference's 1392×752
    assert edit_size(900, 1600, "buckets") == (1392, 752)
    assert edit_size(1000, 500, "buckets") == (720, 1456)  # wider than any bucket → the widest
    assert edit_size(1600, 900, "buckets") == bucket_for(1600, 900, 1024)  # one list for trainer and editor
    h, w = edit_size(1024, 768, 512)  # the 512-px mode keeps the aspect at ~512² pixels
    assert (h, w) == (448, 592) and h % 16 == 0 and w % 16 == 0


def test_a_hub_id_loads_from_the_local_cache_and_provenance_says_what_ran(kontext, tmp_path, monkeypatch):
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--x2edit-tests--tiny-kontext"
    shutil.copytree(kontext, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    editor = DiffusersEditor(config("x2edit-tests/tiny-kontext", dtype="bfloat16", steps=3, guidance=3.0))
    editor.edit([image(64, 64)], [request(0)])
    prov = editor.provenance()
    assert prov["model"] == "x2edit-tests/tiny-kontext" and prov["revision"] == COMMIT
    assert prov["pipeline"] == "FluxKontextPipeline" and prov["worker"] == "diffusers"
    assert prov["dtype"] == "float32" and prov["device"] == "cpu"  # bf16 asked, CPU falls back
    assert (prov["steps"], prov["guidance"], prov["resolution"]) == (3, 3.0, 64)
    assert "manual_seed(seed)" in prov["seeding"] and prov["load_seconds"] > 0
    assert prov["libraries"]["diffusers"] and json.dumps(prov)  # JSON-ready for the pair record


def test_a_missing_model_names_the_id_and_the_cache_folder(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    looked: list[str] = []
    monkeypatch.setattr(diffusers_editor, "resolve_model",
                        lambda model, revision: looked.append(model) or resolve_model(model, revision))
    editor = DiffusersEditor(config("black-forest-labs/FLUX.1-Kontext-dev"))
    with pytest.raises(ModelNotFound, match="black-forest-labs/FLUX.1-Kontext-dev") as caught:
        editor.edit([image(64, 64)], [request(0)])
    assert str(tmp_path / "hub") in str(caught.value)
    with pytest.raises(ModelNotFound):  # the stage retries pair by pair: the failed load is not tried again
        editor.edit([image(64, 64)], [request(1)])
    assert looked == ["black-forest-labs/FLUX.1-Kontext-dev"]
    with pytest.raises(ModelNotFound, match="no/such/folder"):
        DiffusersEditor(config(tmp_path / "no/such/folder")).edit([image(64, 64)], [request(0)])


def test_out_of_memory_halves_the_batch_and_fails_an_item_that_does_not_fit_alone():
    calls: list[list[str]] = []

    def fn(batch: list[str]) -> list[str]:
        calls.append(batch)
        if len(batch) > 1 or batch == ["huge"]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return [item.upper() for item in batch]

    out = run_batched(fn, ["a", "b", "huge", "c", "d"], batch_size=4)
    assert [len(batch) for batch in calls] == [4, 2, 1, 1, 1, 1, 1]  # 4 → 2 → 1, then 1 for the rest
    assert out[:2] == ["A", "B"] and out[3:] == ["C", "D"]
    assert isinstance(out[2], ItemFailed) and out[2].reason == "oom" and "20.00 GiB" in out[2].message
    assert run_batched(lambda batch: [x * 2 for x in batch], [1, 2, 3], batch_size=2) == [2, 4, 6]


def test_config_is_validated_and_covers_only_its_tasks(kontext):
    assert DiffusersEditor(config(kontext)).covers() == {"style_change", "tone_transformation"}
    defaults = DiffusersEditor.Config(model="m", tasks=("style_change",))
    assert (defaults.pipeline, defaults.steps, defaults.guidance, defaults.resolution) == (
        "FluxKontextPipeline", 28, 2.5, "buckets")  # the reference's Kontext settings
    for bad, where in [({"tasks": ("style_swap",)}, "style_swap"), ({"tasks": ()}, "tasks"),
                       ({"pipeline": "Step1XEditPipeline"}, "pipeline"), ({"resolution": 500}, "multiple of 16"),
                       ({"dtype": "int8"}, "dtype"), ({"steps": 0}, "steps"), ({"seed": 1}, "seed")]:
        with pytest.raises(ValidationError, match=where):
            config(kontext, **bad)


def test_a_lost_publish_race_keeps_the_winner_and_leaves_no_temporary_folder(tmp_path):
    """Two actors building the same tiny model at first use: the first rename wins, the second copy goes."""
    from trainer.tiny_flux import publish

    class Part:
        def __init__(self, text: str) -> None:
            self.text = text

        def save_pretrained(self, folder: Path) -> None:
            (folder / "weights.txt").write_text(self.text)

    target = tmp_path / "tiny-model"
    assert publish(target, Part("first")) == target
    assert publish(target, Part("second")) == target
    assert (target / "weights.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-model"]


def test_gpu_bench_runs_tiny_on_cpu_and_exits_cleanly_without_cuda(tmp_path):
    out = tmp_path / "kontext.json"
    done = subprocess.run([sys.executable, "-m", "bench.kontext_gpu", "--device", "cpu", "--tiny", "--steps", "1",
                           "--batch-sizes", "1", "2", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert [(r["size"], r["batch"], r["status"]) for r in report["results"]] == [
        ("64", 1, "ok"), ("64", 2, "ok"), ("128", 1, "ok"), ("128", 2, "ok")]
    assert all(r["s_per_image"] > 0 and r["peak_memory_gib"] is None for r in report["results"])
    assert "| 128 | 128×128 | 2 |" in out.with_suffix(".md").read_text()
    if not torch.cuda.is_available():
        done = subprocess.run([sys.executable, "-m", "bench.kontext_gpu", "--out", str(tmp_path / "gpu.json")],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "no CUDA device" in done.stdout
        assert not (tmp_path / "gpu.json").exists()
