"""The learned scorers (Aesthetic Predictor V2.5, DINO, CLIP-I/CLIP-T) on tiny random-weight checkpoints built
through `build_tiny` into a fresh folder: each against a naive reference computed here with the transformers
model itself, batched equal to one by one, in the score stage with a rule on their scores (no Ray), and the
learned aesthetic as the source stage's pre-filter."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoImageProcessor, CLIPModel, CLIPProcessor, Dinov2Model, SiglipImageProcessor, \
    SiglipVisionModel

from filters.aesthetic import AestheticConfig, AestheticScorer
from filters.similarity import ClipConfig, DinoConfig
from filters.vlm_judges import EditPair, Scored
from manifests.images import encode_jpeg, encode_mask
from manifests.schema import FAILED, LIVE, REJECTED, empty_row
from stages.base import StageContext
from stages.score import SCORERS, ScoreConfig, ScoreStage
from stages.source import InputConfig, SourceConfig, SourceStage, plan_units
from tests.badinputs import good_jpeg
from workers.sample_images import generate_scene
from workers.tiny_models import TINY_MODELS_ENV, build_tiny
from workers.vision_encoders import HEAD_FILE, AestheticPredictor

CTX = StageContext(seed=0, recipe_hash="h", run_dir=".")
MODELS = {"aesthetic_v2_5": "tiny:siglip-aesthetic", "dino": "tiny:dinov2", "clip": "tiny:clip"}
CONFIGS = {"aesthetic_v2_5": AestheticConfig, "dino": DinoConfig, "clip": ClipConfig}


@pytest.fixture(scope="module", autouse=True)
def tiny_dir(tmp_path_factory):
    """A fresh folder: the test proves the builders, not a cache from an earlier run."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(TINY_MODELS_ENV, str(tmp_path_factory.mktemp("tiny-models")))
        yield {name: build_tiny(name) for name in ("siglip-aesthetic", "dinov2", "clip")}


def scene(index: int, size: tuple[int, int] = (96, 64)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A generated scene, the same with its object inverted (a visible edit), and the object's mask."""
    image, mask = generate_scene(index)
    image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    mask = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
    edited = image.copy()
    edited[mask] = 255 - edited[mask]
    return image, edited, mask


def pairs() -> list[EditPair]:
    """Edits of several sizes (one batch mixes them), an unchanged pair, and one without English."""
    out = [EditPair(*scene(i, size)[:2], f"Invert the object number {i}", "把物体反色")
           for i, size in enumerate([(96, 64), (64, 64), (50, 90), (128, 96)])]
    src = out[0].source
    return out + [EditPair(src, src.copy(), "Change nothing", None), EditPair(src, out[0].edited, None, "反色")]


def scorer(backend: str, **overrides):
    return SCORERS[backend](CONFIGS[backend](model=MODELS[backend], **overrides))


# --- each scorer against the model read by hand ---------------------------------------------------------------

def test_dino_is_the_mapped_cosine_of_mean_pooled_tokens(tiny_dir):
    model, processor = Dinov2Model.from_pretrained(tiny_dir["dinov2"]), AutoImageProcessor.from_pretrained(
        tiny_dir["dinov2"])
    cases = pairs()
    with torch.no_grad():
        pooled = [model(**processor(images=[p.source, p.edited], return_tensors="pt")).last_hidden_state.mean(1)
                  for p in cases]
    expected = [(torch.cosine_similarity(a[:1], a[1:]).item() + 1) / 2 for a in pooled]
    got = [s.scores["dino"] for s in scorer("dino").score(cases)]
    assert got == pytest.approx(expected, abs=1e-5)
    assert got[4] == pytest.approx(1.0, abs=1e-5) and max(got[:4]) < 0.9999  # unchanged pair vs real edits


def test_clip_i_and_clip_t_are_cosines_of_clip_features(tiny_dir):
    model, processor = CLIPModel.from_pretrained(tiny_dir["clip"]), CLIPProcessor.from_pretrained(tiny_dir["clip"])
    cases = pairs()
    with torch.no_grad():
        images = [model.get_image_features(**processor(images=[p.source, p.edited], return_tensors="pt"))
                  .pooler_output for p in cases]
        texts = [model.get_text_features(**processor(text=[p.instruction_en], return_tensors="pt")).pooler_output
                 for p in cases[:5]]
    out = scorer("clip").score(cases)
    assert [s.scores["clip_i"] for s in out] == pytest.approx(
        [torch.cosine_similarity(a[:1], a[1:]).item() for a in images], abs=1e-5)
    assert [s.scores["clip_t"] for s in out[:5]] == pytest.approx(
        [torch.cosine_similarity(t, a[1:]).item() for t, a in zip(texts, images)], abs=1e-5)
    assert out[4].scores["clip_i"] == pytest.approx(1.0, abs=1e-5)
    # No English instruction: clip_t absent with its reason, clip_i still given.
    assert set(out[5].scores) == {"clip_i"} and out[5].missing["clip_t"].reason == "no_instruction"


def head_by_hand(state: dict[str, torch.Tensor], pooled: torch.Tensor) -> torch.Tensor:
    """The released head's five Linear layers (dropouts are identities in eval) on the normalised embedding."""
    x = pooled / pooled.norm(dim=-1, keepdim=True)
    for i in (0, 2, 4, 6, 8):
        x = x @ state[f"scoring_head.{i}.weight"].T + state[f"scoring_head.{i}.bias"]
    return x[:, 0]


def test_aesthetic_is_the_head_on_the_normalised_siglip_pooler(tiny_dir):
    folder = tiny_dir["siglip-aesthetic"]
    model, processor = SiglipVisionModel.from_pretrained(folder), SiglipImageProcessor.from_pretrained(folder)
    cases = pairs()[:3]
    with torch.no_grad():
        expected = [head_by_hand(load_file(folder / HEAD_FILE), model(
            **processor(images=[p.source, p.edited], return_tensors="pt")).pooler_output).tolist() for p in cases]
    aesthetic = scorer("aesthetic_v2_5", dtype="float32")
    assert aesthetic.encoder.load_seconds is None  # constructing it loaded nothing
    for s, (src, edited) in zip(aesthetic.score(cases), expected):
        assert (s.scores["aesthetic_src"], s.scores["aesthetic_edited"]) == pytest.approx((src, edited), abs=1e-5)
        assert s.scores["aesthetic_delta"] == pytest.approx(edited - src, abs=1e-6)
    provenance = aesthetic.provenance()
    assert (provenance["model"], provenance["dtype"], provenance["device"]) == ("tiny:siglip-aesthetic", "float32",
                                                                               "cpu")
    assert provenance["load_seconds"] > 0 and len(provenance["head_sha256"]) == 16


@pytest.mark.parametrize("prefix, suffix", [("scoring_head.", ".pth"), ("layers.scoring_head.", ".pth"),
                                            ("layers.", ".pth"), ("scoring_head.", ".safetensors")])
def test_the_released_head_layout_loads_from_either_format(tiny_dir, tmp_path, prefix, suffix):
    """discus0434's .pth holds the head module's keys; it is read with weights_only (no pickled code)."""
    state = {prefix + k.removeprefix("scoring_head."): v for k, v in
             load_file(tiny_dir["siglip-aesthetic"] / HEAD_FILE).items()}
    file = tmp_path / f"aesthetic_predictor_v2_5{suffix}"
    if suffix == ".pth":
        torch.save(state, file)
    else:
        from safetensors.torch import save_file
        save_file(state, str(file))
    cases = pairs()[:2]
    given = scorer("aesthetic_v2_5", head=str(file)).score(cases)
    assert [s.scores for s in given] == [s.scores for s in scorer("aesthetic_v2_5").score(cases)]


def test_a_head_of_another_width_is_refused_naming_its_file(tiny_dir, tmp_path):
    file = tmp_path / "wrong.pth"
    torch.save({"scoring_head.0.weight": torch.zeros(1024, 1152), "scoring_head.0.bias": torch.zeros(1024)}, file)
    with pytest.raises(ValueError, match="wrong.pth does not fit a V2.5 head of width 32"):
        scorer("aesthetic_v2_5", head=str(file)).score(pairs()[:1])


@pytest.mark.parametrize("backend", sorted(MODELS))
def test_batched_equals_one_by_one(backend):
    cases = pairs()
    batched, single = scorer(backend, batch_size=4).score(cases), scorer(backend, batch_size=1).score(cases)
    for b, s in zip(batched, single):
        assert b.scores.keys() == s.scores.keys() and b.missing.keys() == s.missing.keys()
        assert list(b.scores.values()) == pytest.approx(list(s.scores.values()), abs=1e-5)


def test_every_scorer_declares_the_range_of_every_score_it_writes():
    for cls in SCORERS.values():
        assert set(cls.ranges) == set(cls.names), cls.backend
        assert all(low < high for low, high in cls.ranges.values())


# --- the score stage --------------------------------------------------------------------------------------------

def row(index: int, task: str, edited: bool = True, instruction: str | None = "Invert the object") -> dict:
    src, changed, mask = scene(index)
    return {**empty_row(), "unit_id": f"u{index}", "sample_id": f"s{index}", "pair_id": f"p{index}",
            "status": LIVE, "task": task, "src": encode_jpeg(src), "edited": encode_jpeg(changed if edited else src),
            "mask": encode_mask(mask), "instruction_en": instruction, "instruction_zh": "把物体反色",
            "scores": "{}", "provenance": "{}"}


def score_stage(**policy) -> ScoreStage:
    cfg = ScoreConfig.model_validate({"scorers": {name: {"backend": backend, "model": model}
                                                  for name, (backend, model) in zip(("aes", "dn", "cl"),
                                                                                    MODELS.items())}, **policy})
    return ScoreStage(cfg, CTX)


def test_the_score_stage_stores_learned_scores_and_a_rule_rejects_on_them():
    # §1.9: DINO > 0.95 means the content did not change; CLIP-T needs the English instruction.
    stage = score_stage(rules=[{"score": "dino", "max": 0.95, "reason": "content_unchanged"},
                               {"score": "clip_t", "min": -1.0, "reason": "text_not_followed"}])
    assert all(s.encoder.load_seconds is None for s in stage.scorers.values())  # constructing loaded nothing
    out = stage.process([row(0, "style_change"), row(1, "style_change", edited=False),
                         row(2, "style_change", instruction=None)])
    edited, unchanged, untold = sorted(out, key=lambda r: r["unit_id"])
    scores = json.loads(edited["scores"])
    assert edited["status"] == LIVE and set(scores) >= {*AestheticScorer.names, "dino", "clip_i", "clip_t"}
    assert set(json.loads(edited["provenance"])["score"]) == {"aes", "dn", "cl"}
    assert (unchanged["status"], unchanged["reason"]) == (REJECTED, "content_unchanged")
    assert json.loads(unchanged["scores"])["dino"] == pytest.approx(1.0, abs=1e-5)
    assert (untold["status"], untold["reason"]) == (REJECTED, "no_instruction")
    assert untold["message"].startswith("cl could not give clip_t")


def test_a_score_outside_its_range_fails_its_row_as_a_bug():
    stage = score_stage()
    stage.scorers["dn"]._score = lambda batch: [Scored({"dino": v}, {}) for v in (0.5, float("nan"), 1.5)[:len(batch)]]
    out = stage.process([row(0, "style_change"), row(1, "style_change"), row(2, "style_change")])
    kept, nan, over = sorted(out, key=lambda r: r["unit_id"])
    assert kept["status"] == LIVE
    assert [(r["status"], r["reason"]) for r in (nan, over)] == [(FAILED, "ScoreOutOfRange")] * 2
    assert "dino=1.5, outside [0.0, 1.0]" in over["message"]


# --- the source stage's pre-filter ------------------------------------------------------------------------------

def source_rows(folder: Path, **source) -> dict[str, dict]:
    cfg = InputConfig(kind="folder", paths=[str(folder)])
    stage = SourceStage((cfg, SourceConfig(min_side=64, work_short_side=64, **source)), CTX)
    return {r["source_uri"].rsplit("/", 1)[-1]: r for t in stage(pa.Table.from_pylist(plan_units(cfg)))
            for r in t.to_pylist()}


def test_the_source_prefilter_rejects_below_the_learned_aesthetic_floor(tmp_path):
    images = {f"{i}.jpg": good_jpeg(96, 80, seed=i) for i in range(6)}
    for name, data in images.items():
        (tmp_path / name).write_bytes(data)
    assert all("aesthetic" not in json.loads(r["scores"]) for r in source_rows(tmp_path).values())  # unchanged

    model = {"model": MODELS["aesthetic_v2_5"]}
    predictor = AestheticPredictor(SourceConfig(aesthetic=model).aesthetic)
    values = {name: predictor.predict([cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)])[0]
              for name, data in images.items()}
    floor = float(np.median(list(values.values())))
    rows = source_rows(tmp_path, aesthetic={**model, "min": floor})
    for name, r in rows.items():
        assert json.loads(r["scores"])["aesthetic"] == pytest.approx(values[name], abs=1e-5)
        if values[name] < floor:
            assert (r["status"], r["reason"]) == (REJECTED, "low_aesthetic")
            assert json.loads(r["thresholds"]) == [{"score": "aesthetic", "min": floor}]
        else:
            assert r["status"] == LIVE and json.loads(r["source_meta"])["aesthetic"]["model"] == "tiny:siglip-aesthetic"
    assert {r["status"] for r in rows.values()} == {LIVE, REJECTED}
