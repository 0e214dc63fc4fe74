"""The expert removal/addition chain (workers/expert_removal.py) on tiny random-weight checkpoints of its four
model families, built offline through `tiny:<name>`: CLIP tags, Grounding DINO boxes, SAM 2 masks, the gates
and a TorchScript LaMa. Random weights find no real objects: the tagger's softmax is near-uniform, boxes land
anywhere and masks are speckle, so the area gate decides which tags pass (some do, most do not) and the
foreground gate is off unless a test is about it. Run with -s to see the timings per step (never asserted)."""
from __future__ import annotations

import time

import numpy as np
import pytest
from pydantic import ValidationError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from manifests.rejected import Rejected  # noqa: E402
from workers.base import EditOutput, EditRequest, Proposal  # noqa: E402
from workers.clip_tagger import load_vocabulary  # noqa: E402
from workers.expert_removal import ExpertRemovalEditor  # noqa: E402
from workers.lama import LamaInpainter, lama_file  # noqa: E402
from workers.model_lifecycle import resolve_model  # noqa: E402
from workers.sample_images import generate_scene  # noqa: E402
from workers.segment_classical import find_subject  # noqa: E402
from workers.tiny_models import TINY_MODELS_ENV, build_tiny  # noqa: E402

MODELS = ("clip", "grounding-dino", "sam2", "lama")
N_SCENES = 12
# big-lama.pt is TorchScript, which torch 2.14 deprecates (it still loads): expected, not news, in every test here.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\..*` is deprecated:FutureWarning")


@pytest.fixture(scope="module", autouse=True)
def tiny_dir(tmp_path_factory):
    """`tiny:<name>` builds into a fresh folder: the test proves the builders, not a cache from an earlier run."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(TINY_MODELS_ENV, str(tmp_path_factory.mktemp("tiny-models")))
        seconds = {}
        for name in MODELS:
            start = time.perf_counter()
            build_tiny(name)
            seconds[name] = time.perf_counter() - start
        print("\nbuild: " + ", ".join(f"{name} {s:.2f} s" for name, s in seconds.items()))
        yield


def config(**overrides) -> ExpertRemovalEditor.Config:
    # The reference's thresholds and area gate; the foreground gate off (random masks are not on the subject).
    settings = dict(clip_model="tiny:clip", grounding_model="tiny:grounding-dino", sam2_model="tiny:sam2",
                    lama="tiny:lama", min_foreground=0.0, batch_size=2)
    return ExpertRemovalEditor.Config(**{**settings, **overrides})


def scene(index: int) -> np.ndarray:
    """A generated scene cropped off the multiples of 8 its sizes come in, so LaMa's padding is exercised."""
    return np.ascontiguousarray(generate_scene(index)[0][:-3, :-5])


def request(proposal: Proposal) -> EditRequest:
    return EditRequest(op=proposal.op, params=proposal.params, instruction_en=proposal.instruction_en,
                       instruction_zh=proposal.instruction_zh, seed=0, subject=proposal.subject)


@pytest.fixture(scope="module")
def editor() -> ExpertRemovalEditor:
    return ExpertRemovalEditor(config())


@pytest.fixture(scope="module")
def scenes(editor) -> list[tuple[np.ndarray, Proposal | None, Proposal | None]]:
    """(image, removal, addition) per scene; the addition reuses the removal's chain (same image)."""
    return [(image, editor.propose("subject_removal", image, None, np.random.default_rng(index)),
             editor.propose("subject_addition", image, None, np.random.default_rng(index)))
            for index, image in enumerate(map(scene, range(N_SCENES)))]


@pytest.fixture(scope="module")
def proposals(scenes) -> list[tuple[np.ndarray, Proposal, Proposal]]:
    """The scenes some tag of which passes the gates."""
    return [row for row in scenes if row[1] is not None]


def test_each_tiny_model_loads_through_its_family_loader():
    vocabulary = load_vocabulary()
    clip = resolve_model("tiny:clip").path
    model = transformers.CLIPModel.from_pretrained(clip, use_safetensors=True)
    processor = transformers.CLIPProcessor.from_pretrained(clip)
    inputs = processor(text=["a photo of a cup.", "a photo of a dog."], images=np.zeros((40, 50, 3), np.uint8),
                       return_tensors="pt", padding=True)
    assert model(**inputs).logits_per_image.shape == (1, 2)

    dino = resolve_model("tiny:grounding-dino").path
    assert transformers.GroundingDinoForObjectDetection.from_pretrained(dino).config.decoder_layers >= 2
    tokenizer = transformers.GroundingDinoProcessor.from_pretrained(dino).tokenizer
    unknown = [tag.en for tag in vocabulary.tags if tokenizer.unk_token in tokenizer.tokenize(f"{tag.en}.")]
    assert unknown == []  # every caption the chain sends tokenises into known word pieces

    sam = resolve_model("tiny:sam2").path
    model = transformers.Sam2Model.from_pretrained(sam, use_safetensors=True)
    inputs = transformers.Sam2Processor.from_pretrained(sam)(images=np.zeros((64, 80, 3), np.uint8),
                                                             input_boxes=[[[4, 4, 40, 30]]], return_tensors="pt")
    assert inputs["pixel_values"].shape[-2:] == (256, 256)
    with torch.inference_mode():
        assert model(**inputs, multimask_output=False).pred_masks.shape[:3] == (1, 1, 1)

    lama = torch.jit.load(str(lama_file("tiny:lama")))
    image, mask = torch.rand(2, 3, 16, 24), torch.zeros(2, 1, 16, 24)
    mask[:, :, 4:9, 5:12] = 1
    out = lama(image, mask)
    assert out.shape == image.shape and torch.equal(out[mask.expand_as(out) == 0], image[mask.expand_as(out) == 0])


def test_tags_pass_or_fail_the_gates_as_the_reference_decides(editor, scenes):
    """Every tag either has no box, or its mask fails the area gate, or it passes; the first pass is proposed."""
    reasons = []
    for image, proposal, addition in scenes:
        findings = list(editor.findings(image))
        assert len(findings) <= editor.cfg.tag_top_k
        for finding in findings:
            reasons.append(finding.reason)
            if finding.reason == "no_box":
                assert finding.mask is None
                continue
            assert finding.mask.shape == image.shape[:2] and finding.area == pytest.approx(finding.mask.mean())
            inside = editor.cfg.min_area <= finding.area <= editor.cfg.max_area
            assert (finding.reason != "mask_area") == inside
        first = next((f for f in findings if f.reason is None), None)
        assert (proposal is None) == (addition is None) == (first is None)
        if proposal is not None:
            assert proposal.params["tag_en"] == first.tag.en
    assert None in reasons and "mask_area" in reasons  # some tags pass, some are rejected
    print(f"\n{N_SCENES} scenes: " + ", ".join(f"{r or 'passed'} {reasons.count(r)}" for r in sorted(
        set(reasons), key=str)))


def test_foreground_gate_is_the_share_of_the_mask_inside_the_classical_subject():
    editor = ExpertRemovalEditor(config(min_foreground=0.3))
    for index in range(4):
        image = scene(index)
        salient = find_subject(image)
        for finding in editor.findings(image):
            if finding.foreground is None:
                continue
            expected = (finding.mask & salient.mask).sum() / finding.mask.sum() if salient else 0.0
            assert finding.foreground == pytest.approx(expected)
            assert (finding.reason == "not_foreground") == (finding.foreground < 0.3)


def test_removal_changes_pixels_inside_its_hole_only_and_addition_is_its_reverse(editor, proposals):
    assert proposals, "no scene passed the gates"
    images, requests = [], []
    for image, removal, addition in proposals:
        for proposal, task, op in ((removal, "subject_removal", "expert.remove"),
                                   (addition, "subject_addition", "expert.add")):
            assert (proposal.task, proposal.op) == (task, op)
            assert editor.cfg.min_area <= proposal.params["mask_area"] <= editor.cfg.max_area
            assert proposal.subject.mask.shape == image.shape[:2]
            assert proposal.subject.area_frac == pytest.approx(proposal.params["mask_area"], abs=1e-4)
            images.append(image)
            requests.append(request(proposal))
        tag = next(t for t in load_vocabulary().tags if t.en == removal.params["tag_en"])
        assert removal.params["tag_zh"] == tag.zh
        assert removal.instruction_en == f"Delete {tag.en} in the picture"
        assert removal.instruction_zh == f"把这张图片的{tag.zh}删掉"
        assert tag.en in addition.instruction_en and tag.zh in addition.instruction_zh
        assert addition.params == removal.params
    outputs = editor.edit(images, requests)  # sizes differ: batches form per padded size
    assert all(isinstance(out, EditOutput) for out in outputs)
    for k, (image, _, _) in enumerate(proposals):
        removed, added = outputs[2 * k], outputs[2 * k + 1]
        assert removed.source is image and removed.edited.shape == image.shape
        assert removed.mask.shape == image.shape[:2] and (removed.mask >= requests[2 * k].subject.mask).all()
        changed = (removed.edited != image).any(axis=-1)
        assert changed.any() and not (changed & ~removed.mask).any()
        assert added.edited is image and np.array_equal(added.source, removed.edited)
        assert np.array_equal(added.mask, removed.mask)
    loads = editor.provenance()["load_seconds"]
    print(f"\n{len(proposals)} of {N_SCENES} scenes proposed; the chain ran twice over each, then "
          f"{len(proposals)} removals and additions were inpainted; steps (s, models' first use included): "
          + ", ".join(f"{step} {s:.2f}" for step, s in editor.step_seconds.items())
          + "; loads (s): " + ", ".join(f"{name} {s:.2f}" for name, s in loads.items()))


def test_a_gate_nothing_passes_proposes_nothing(proposals):
    editor = ExpertRemovalEditor(config(min_area=0.0001, max_area=0.001))
    image = proposals[0][0]
    assert editor.propose("subject_removal", image, None, np.random.default_rng(0)) is None
    assert {f.reason for f in editor.findings(image)} <= {"no_box", "mask_area"}
    assert editor.propose("style_change", image, None, np.random.default_rng(0)) is None


def test_provenance_names_every_model_and_setting(editor, proposals):
    record = editor.provenance()
    assert record["worker"] == "expert_removal" and record["tagger"]["route"] == "clip-zero-shot"
    for part, model in (("tagger", "tiny:clip"), ("grounding", "tiny:grounding-dino"),
                        ("segmentation", "tiny:sam2"), ("inpainting", "tiny:lama")):
        assert record[part]["model"] == model and record[part]["dtype"] == "float32"
        assert record[part]["device"] == "cpu" and record["load_seconds"][part] is not None
    assert record["tagger"]["revision"] == record["grounding"]["revision"] == "random-weights"
    assert len(record["inpainting"]["sha256"]) == 16
    assert (record["grounding"]["box_threshold"], record["grounding"]["text_threshold"]) == (0.3, 0.25)
    assert record["gates"]["mask_area"] == [0.02, 0.35] and "find_subject" in record["gates"]["foreground"]


def test_the_hole_grows_by_the_reference_kernel_scaled_to_the_image():
    dot = np.zeros((512, 640), bool)
    dot[200, 300] = True
    width = lambda hole: int(hole.any(axis=0).sum())  # noqa: E731
    assert width(ExpertRemovalEditor(config()).hole(dot)) == 11  # 12 px at 1024 → 6 px at 512, twice: 2·5+1
    assert width(ExpertRemovalEditor(config(dilation_side=None)).hole(dot)) == 23  # the reference's 12 px, twice


class _WrongShape(torch.nn.Module):
    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return image[:, :1]


class _NotFinite(torch.nn.Module):
    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return image * float("nan")


@pytest.mark.parametrize("module", [_WrongShape, _NotFinite])
def test_an_unreadable_inpainting_is_rejected(tmp_path, module):
    path = tmp_path / "bad-lama.pt"
    torch.jit.script(module()).save(str(path))
    hole = np.zeros((30, 44), bool)
    hole[5:20, 10:30] = True
    results = LamaInpainter(str(path), batch_size=4).inpaint([scene(0)[:30, :44]] * 2, [hole] * 2)
    assert all(isinstance(r, Rejected) and r.reason == "inpaint_unreadable" for r in results)


def test_config_is_checked():
    with pytest.raises(ValidationError, match="min_area"):
        config(min_area=0.5, max_area=0.4)
    with pytest.raises(ValidationError, match="box_treshold"):
        config(box_treshold=0.3)  # a misspelt key is an error, not a default
    with pytest.raises(ValidationError, match="lama"):
        ExpertRemovalEditor.Config()
    assert ExpertRemovalEditor(config(tasks=["subject_removal"])).covers() == {"subject_removal"}
