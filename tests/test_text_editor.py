"""The OCR-gated text-change editor (workers/text_editor.py) on generated signs (workers/text_samples.py), with
the real PP-OCRv4 models that ship inside the rapidocr-onnxruntime wheel. Run with -s to see the timings."""
from __future__ import annotations

import dataclasses
import importlib.metadata
import time
from pathlib import Path

import numpy as np
import pydantic
import pytest
from PIL import Image, ImageDraw, ImageFont

from manifests.rejected import Rejected
from workers import text_editor
from workers.base import EditOutput, EditRequest, Proposal
from workers.sample_images import generate_scene
from workers.text_editor import TextEditor, choose_word, normalize
from workers.text_samples import generate_text_sample

N_SIGNS = 12
CJK_FONT = Path("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc")  # Debian's fonts-wqy-microhei (make browser)
OPENCV_DISTRIBUTIONS = ("opencv-python", "opencv-python-headless", "opencv-contrib-python",
                        "opencv-contrib-python-headless")


def _installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_one_opencv_distribution():
    """rapidocr-onnxruntime requires opencv-python; installed with it, that wheel would overwrite the cv2/ of
    opencv-contrib-python-headless (they share the folder) and the contrib modules would be gone."""
    import cv2

    assert [name for name in OPENCV_DISTRIBUTIONS if _installed(name)] == ["opencv-contrib-python-headless"]
    assert hasattr(cv2, "xphoto")
    assert _installed("rapidocr-onnxruntime")


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
