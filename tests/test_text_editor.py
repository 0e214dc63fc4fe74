"""The OCR-gated text-change editor (workers/text_editor.py) on generated signs (workers/text_samples.py), with
the real PP-OCRv4 models that ship inside the rapidocr-onnxruntime wheel. Run with -s to see the timings."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import cv2
import numpy as np
import pydantic
import pytest
from PIL import Image, ImageDraw, ImageFont

from manifests.rejected import Rejected
from workers import text_editor
from workers.base import EditOutput, EditRequest, Proposal
from workers.sample_images import generate_scene
from workers.text_editor import TextEditor, choose_word, normalize
from workers.text_fill import FillConfig, FillJob, TextFill, glyph_template
from workers.text_samples import generate_text_sample

N_SIGNS = 12
CJK_FONT = Path("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc")  # Debian's fonts-wqy-microhei (make browser)


def _request(proposal: Proposal, seed: int = 0) -> EditRequest:
    return EditRequest(op=proposal.op, params=proposal.params, instruction_en=proposal.instruction_en,
                       instruction_zh=proposal.instruction_zh, seed=seed, subject=None)


@pytest.fixture(scope="module")
def editor() -> TextEditor:
    return TextEditor()


@pytest.fixture(scope="module")
def signs(editor: TextEditor) -> list[tuple[np.ndarray, str, Proposal | None, float]]:
    """(image, its main text, the editor's proposal, seconds the proposal took: mostly the OCR) per sign."""
    rows = []
    for index in range(N_SIGNS):
        image, text = generate_text_sample(index)
        start = time.perf_counter()
        proposal = editor.propose("text_change", image, None, np.random.default_rng(index))
        rows.append((image, text, proposal, time.perf_counter() - start))
    return rows


def test_signs_are_deterministic_and_readable(editor: TextEditor):
    image, text = generate_text_sample(3)
    again, _ = generate_text_sample(3)
    assert np.array_equal(image, again)
    assert normalize(text) in [normalize(reading.text) for reading in editor.read(image)]


def test_propose_picks_the_largest_text(signs):
    for image, text, proposal, _ in signs:
        assert proposal is not None and proposal.task == "text_change" and proposal.op == "text.replace"
        old, new = proposal.params["old"], proposal.params["new"]
        assert normalize(old) == normalize(text)  # the sign's big word, not its tagline
        assert normalize(new) != normalize(old) and abs(len(normalize(new)) - len(normalize(old))) <= 3
        assert len(proposal.params["quad"]) == 4


def test_instruction_names_old_and_new_in_both_languages(signs):
    for _, _, proposal, _ in signs:
        old, new = proposal.params["old"], proposal.params["new"]
        for instruction in (proposal.instruction_en, proposal.instruction_zh):
            assert old in instruction and new in instruction, instruction
        assert any("\u4e00" <= ch <= "\u9fff" for ch in proposal.instruction_zh)


def test_edits_pass_the_ocr_round_trip(editor: TextEditor, signs):
    passed = 0
    for index, (image, _, proposal, propose_s) in enumerate(signs):
        start = time.perf_counter()
        [result] = editor.edit([image], [_request(proposal, index)])
        edit_s = time.perf_counter() - start
        verdict = result.reason if isinstance(result, Rejected) else "read back"
        print(f"sign {index:2d}: propose (OCR) {propose_s:.2f} s, edit (+ OCR) {edit_s:.2f} s, "
              f"{proposal.params['old']!r} -> {proposal.params['new']!r}: {verdict}")
        if isinstance(result, EditOutput):
            passed += 1
            assert result.source is image and result.edited.shape == image.shape
            assert result.mask.dtype == bool and result.mask.mean() >= editor.cfg.min_area
            assert np.array_equal(result.edited[~result.mask], image[~result.mask])  # nothing changes outside
            assert not np.array_equal(result.edited[result.mask], image[result.mask])
            found = [r.text for r in editor.read(result.edited)]
            assert normalize(proposal.params["new"]) in map(normalize, found)
    print(f"OCR round trip: {passed}/{len(signs)} passed")
    # Everything is seeded; a bound below 100 % leaves room for onnxruntime's CPU kernels to differ in the last bit.
    assert passed >= len(signs) - 2


def test_unreadable_render_is_rejected(editor: TextEditor, signs, monkeypatch):
    monkeypatch.setattr(text_editor, "TEXT_FILL", 0.03)  # the new word squeezed to a few pixels: unreadable
    image, _, proposal, _ = signs[0]
    [result] = editor.edit([image], [_request(proposal)])
    assert isinstance(result, Rejected) and result.reason == "text_not_read_back"
    assert proposal.params["new"] in result.message


def test_missing_glyphs_are_rejected(editor: TextEditor, signs):
    """Pillow's own font has no CJK glyphs: the boxes it draws instead cannot be read back."""
    image, _, proposal, _ = signs[1]
    tofu = dataclasses.replace(proposal, params={**proposal.params, "new": "面包店"})
    [result] = editor.edit([image], [_request(tofu)])
    assert isinstance(result, Rejected) and result.reason == "text_not_read_back"


def test_image_without_text_has_no_proposal(editor: TextEditor):
    scene, _ = generate_scene(0)
    assert editor.propose("text_change", scene, None, np.random.default_rng(0)) is None
    image, _ = generate_text_sample(0)
    assert editor.propose("color_change", image, None, np.random.default_rng(0)) is None


def test_small_text_is_skipped():
    image, _ = generate_text_sample(4)
    strict = TextEditor(TextEditor.Config(min_area=0.5))  # no line of text covers half the image
    assert strict.propose("text_change", image, None, np.random.default_rng(0)) is None


def test_word_choice_matches_length_and_case():
    rng = np.random.default_rng(0)
    words = ["garden", "tea", "bookstore", "seafood"]
    assert choose_word("BAKERY", words, rng) in {"GARDEN", "TEA", "BOOKSTORE", "SEAFOOD"}
    assert choose_word("Bakery", ["bakery", "garden"], rng) == "Garden"  # never the old word itself
    assert choose_word("cafe", ["museum"], rng) == "museum"
    assert choose_word("cafe", ["pharmacy"], rng) is None  # 4 letters more than the old text
    assert normalize("Ｔea  House!") == "teahouse"


def test_chinese_needs_a_font():
    with pytest.raises(pydantic.ValidationError, match="font"):
        TextEditor.Config(languages=("en", "zh"))


@pytest.mark.skipif(not CJK_FONT.exists(), reason="no CJK font (Debian's fonts-wqy-microhei)")
def test_chinese_sign_round_trip():
    font = ImageFont.truetype(str(CJK_FONT), 72)
    sign = Image.new("RGB", (640, 480), (180, 170, 150))
    draw = ImageDraw.Draw(sign)
    draw.rounded_rectangle((120, 160, 520, 300), 20, fill=(150, 20, 20))
    draw.text((320, 230), "面包店", font=font, fill=(250, 230, 120), anchor="mm")
    image = np.asarray(sign)
    chinese = TextEditor(TextEditor.Config(languages=("en", "zh"), font=str(CJK_FONT)))
    proposal = chinese.propose("text_change", image, None, np.random.default_rng(0))
    assert proposal is not None and proposal.params["old"] == "面包店" and proposal.params["language"] == "zh"
    [result] = chinese.edit([image], [_request(proposal)])
    assert isinstance(result, EditOutput), result


def test_provenance_names_models_font_and_chooser(editor: TextEditor):
    provenance = editor.provenance()
    assert provenance["worker"] == "text" and provenance["chooser"] == "word_list"
    models = provenance["ocr"]["models"]
    assert {"ch_PP-OCRv4_det_infer.onnx", "ch_PP-OCRv4_rec_infer.onnx"} <= set(models)
    assert all(len(digest) == 12 for digest in models.values())
    assert provenance["font"]["name"] == "Aileron Regular"


# --- renderer fill: a FluxFillPipeline re-draws the region (tiny random weights here) --------------------------

FILL_SIGNS = (0, 1, 9)  # two 512×768 signs (one batched call, panels stacked) and a 640×512 one (side by side)


@pytest.fixture(scope="module")
def tiny_fill(tmp_path_factory):
    """`tiny:flux-fill` built into a fresh folder: the test proves the builder, not a cache from an earlier run."""
    pytest.importorskip("diffusers")
    from workers.tiny_models import TINY_MODELS_ENV, build_tiny

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(TINY_MODELS_ENV, str(tmp_path_factory.mktemp("tiny-models")))
        start = time.perf_counter()
        folder = build_tiny("flux-fill")
        print(f"\nbuild tiny:flux-fill {time.perf_counter() - start:.2f} s")
        yield folder


def fill_settings(**overrides) -> FillConfig:
    settings = dict(model="tiny:flux-fill", dtype="float32", steps=2, resolution=128, batch_size=2,
                    max_sequence_length=64)
    return FillConfig(**{**settings, **overrides})


@pytest.fixture
def pipe_calls(monkeypatch) -> list[dict]:
    """The keyword arguments of every FluxFillPipeline call, which still runs."""
    from diffusers import FluxFillPipeline

    calls: list[dict] = []
    call = FluxFillPipeline.__call__

    def spy(pipe, **kwargs):
        calls.append(kwargs)
        return call(pipe, **kwargs)

    monkeypatch.setattr(FluxFillPipeline, "__call__", spy)
    return calls


def test_fill_renderer_runs_end_to_end_and_random_weights_fail_the_round_trip(tiny_fill, signs, pipe_calls):
    """The whole fill route: glyph panel + mask + pipeline call + crop and resize back + the OCR gate. TextFlux's
    transformer is swapped in the reference's way (here the tiny pipeline's own, from its subfolder). Random
    weights re-draw the region as noise, so every pair ends as the classical renderer's unreadable ones do."""
    editor = TextEditor(TextEditor.Config(renderer="fill", fill=fill_settings(
        transformer=str(tiny_fill), transformer_subfolder="transformer")))
    images = [signs[i][0] for i in FILL_SIGNS]
    proposals = [signs[i][2] for i in FILL_SIGNS]
    start = time.perf_counter()
    results = editor.edit(images, [_request(p, seed) for seed, p in enumerate(proposals)])
    fill = editor.provenance()["fill"]
    print(f"fill: 3 pairs (2 sizes, 2 steps) and their OCR round trips {time.perf_counter() - start:.2f} s, "
          f"of which loading {fill['load_seconds']:.2f} s")
    assert (fill["model"], fill["revision"], fill["dtype"], fill["device"]) == (
        "tiny:flux-fill", "random-weights", "float32", "cpu")
    assert fill["transformer"]["model"] == str(tiny_fill)
    for result, proposal in zip(results, proposals):
        assert isinstance(result, Rejected) and result.reason == "text_not_read_back"
        assert repr(proposal.params["new"]) in result.message

    wide, tall = pipe_calls  # one call per edit size: the two wide signs share one
    words = [[p.params["new"] for p in proposals[:2]], [proposals[2].params["new"]]]
    for call, (h, w), axis, new in ((wide, (128, 192), 0, words[0]), (tall, (160, 128), 1, words[1])):
        assert len(call["image"]) == len(new)
        assert (call["height"], call["width"]) == ((2 * h, w) if axis == 0 else (h, 2 * w))
        assert (call["num_inference_steps"], call["guidance_scale"], call["max_sequence_length"]) == (2, 30.0, 64)
        for panel, mask, prompt, prompt_2, word in zip(call["image"], call["mask_image"], call["prompt"],
                                                       call["prompt_2"], new):
            glyphs, scene = np.split(np.asarray(panel), 2, axis=axis)
            blank, region = np.split(np.asarray(mask) > 0, 2, axis=axis)
            assert not blank.any() and 0 < region.mean() < 0.2  # only the scene's text region is re-drawn
            ink = glyphs.max(axis=2) > 127
            assert ink.any() and not ink[~region].any()  # white glyphs on black, inside the region
            assert scene.std() > 10  # the photograph, not a blank panel
            assert word not in prompt and prompt_2.count(f"'{word}'") == 2  # CLIP: the bare template; T5: the words


def test_fill_keeps_the_source_outside_the_region_and_seeds_per_pair(tiny_fill, signs, pipe_calls):
    """The re-drawn scene panel, resized back, replaces the source inside the region only; each pair's noise comes
    from its own seed, whatever shares its batch."""
    image = signs[0][0]
    fill = TextFill(fill_settings())
    jobs = [_fill_job(fill, image, seed) for seed in (7, 7, 8)]
    together = fill.redraw(jobs)
    alone = fill.redraw(jobs[:1])
    for edited, job in zip(together, jobs):
        assert edited.shape == image.shape and edited.dtype == np.uint8
        assert np.array_equal(edited[~job.region], image[~job.region])
        assert not np.array_equal(edited[job.region], image[job.region])
    assert np.array_equal(together[0], together[1])
    # Alone, the same pair draws the same noise; a batch of one runs other CPU kernels, which may round the last bit
    # differently. Another seed is another picture.
    assert np.abs(together[0].astype(int) - alone[0]).max() <= 2
    assert np.abs(together[0].astype(int) - together[2]).max() > 50
    assert [len(call["image"]) for call in pipe_calls] == [2, 1, 1]  # batch_size 2


def test_fill_backs_off_on_out_of_memory(tiny_fill, signs, monkeypatch):
    torch = pytest.importorskip("torch")
    from diffusers import FluxFillPipeline

    call = FluxFillPipeline.__call__
    sizes: list[int] = []

    def out_of_memory_above_one(pipe, **kwargs):
        sizes.append(len(kwargs["image"]))
        if len(kwargs["image"]) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return call(pipe, **kwargs)

    monkeypatch.setattr(FluxFillPipeline, "__call__", out_of_memory_above_one)
    fill = TextFill(fill_settings())
    results = fill.redraw([_fill_job(fill, signs[0][0], seed) for seed in (1, 2)])
    assert sizes == [2, 1, 1] and all(isinstance(edited, np.ndarray) for edited in results)


def _fill_job(fill: TextFill, image: np.ndarray, seed: int) -> FillJob:
    """A box in the middle of the image to re-draw, its glyph panel a white bar."""
    h, w = fill.edit_size(*image.shape[:2])
    region = np.zeros(image.shape[:2], bool)
    region[200:260, 100:400] = True
    mask = cv2.resize(region.astype(np.uint8), (w, h), interpolation=cv2.INTER_AREA) > 0
    glyphs = np.where(cv2.erode(mask.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0, 255, 0).astype(np.uint8)
    return FillJob(source=image, region=region, glyphs=glyphs, mask=mask, words="SHOP", seed=seed)


def test_fill_provenance_names_the_model_and_settings():
    editor = TextEditor(TextEditor.Config(renderer="fill", fill=fill_settings(
        transformer="yyyyyxie/textflux", transformer_revision="main")))
    provenance = editor.provenance()
    fill = provenance["fill"]
    assert provenance["renderer"] == "fill" and fill["pipeline"] == "FluxFillPipeline"
    assert fill["model"] == "tiny:flux-fill" and fill["device"] is None  # nothing loaded yet
    assert fill["transformer"] == {"model": "yyyyyxie/textflux", "subfolder": None, "revision": "main"}
    assert (fill["steps"], fill["guidance"], fill["resolution"]) == (2, 30.0, 128)
    classical = TextEditor().provenance()
    assert classical["renderer"] == "classical" and "fill" not in classical


def test_fill_renderer_needs_its_block_and_only_it_takes_one():
    with pytest.raises(pydantic.ValidationError, match="fill"):
        TextEditor.Config(renderer="fill")
    with pytest.raises(pydantic.ValidationError, match="fill"):
        TextEditor.Config(fill=FillConfig(model="black-forest-labs/FLUX.1-Fill-dev"))
    reference = FillConfig(model="black-forest-labs/FLUX.1-Fill-dev")
    assert (reference.steps, reference.guidance, reference.max_sequence_length) == (30, 30.0, 512)  # §1.6 step 6


def test_glyph_template_spreads_a_short_word_and_shrinks_a_long_one():
    """TextFlux's layout: a word that fits at the region's height is set at 0.8 of it, letters spread out; one
    that does not spans 0.85 of the width."""
    short = glyph_template("CAFE", 400, 50, ImageFont.load_default) > 127
    ys, xs = np.nonzero(short)
    assert 0.6 * 400 < xs.max() - xs.min() + 1 <= 0.8 * 400  # spread out, at 0.8 of the size that fits
    assert 0.4 * 50 < ys.max() - ys.min() + 1 <= 0.8 * 50
    long = glyph_template("PHARMACY AND BAKERY", 200, 50, ImageFont.load_default) > 127
    ys, xs = np.nonzero(long)
    assert 0.75 * 200 < xs.max() - xs.min() + 1 <= 0.85 * 200 + 1
