"""Heuristic scores and the score stage's decision on real images."""
from __future__ import annotations

import json
import tracemalloc

import cv2
import numpy as np

from filters.heuristics import EDIT_SCORES, IMAGE_SCORES, _mean, _mean_reference, edit_scores, image_scores, quality_score
from filters.policy import Rule
from manifests.images import decode_image, encode_jpeg, encode_mask
from manifests.rejected import Rejected
from manifests.schema import LIVE, REJECTED, empty_row
from stages.base import StageContext
from stages.score import ScoreConfig, ScoreStage
from tests.badinputs import bomb_png
from workers.sample_images import generate_scene


def _row(src: np.ndarray, edited: np.ndarray, mask: np.ndarray | None, task: str) -> dict:
    row = empty_row()
    row.update(unit_id="u", sample_id="s", status=LIVE, task=task, src=encode_jpeg(src), edited=encode_jpeg(edited),
               mask=None if mask is None else encode_mask(mask), scores=json.dumps({"prefilter": 5.0}))
    return row


def _stage() -> ScoreStage:
    cfg = ScoreConfig(rules=[Rule(score="change_global", min=0.01, reason="no_op_edit")],
                      per_task={"subject_removal": [Rule(score="change_outside", max=0.02, reason="edit_outside_mask")]})
    return ScoreStage(cfg, StageContext(seed=0, recipe_hash="h", run_dir="."))


def test_a_no_op_edit_is_rejected_and_its_scores_kept():
    image, _ = generate_scene(1)
    row_in = _row(image, image.copy(), None, "style_change")
    [row] = _stage().process_row(row_in)
    assert (row["status"], row["reason"]) == (REJECTED, "no_op_edit")
    scores = json.loads(row["scores"])
    assert scores["change_global"] < 0.01 and scores["prefilter"] == 5.0 and "sharpness_edited" in scores
    assert row["thumb"] and row["src"] == row_in["src"]  # a policy rejection keeps its images (refilter)
    assert json.loads(row["thresholds"])[0]["reason"] == "no_op_edit"


def test_a_region_edit_that_leaks_outside_its_mask_is_rejected():
    image, mask = generate_scene(2)
    leaky = image.copy()
    leaky[mask] = 255 - leaky[mask]
    leaky[: image.shape[0] // 2] //= 2  # half the background changed too
    [row] = _stage().process_row(_row(image, leaky, mask, "subject_removal"))
    assert row["reason"] == "edit_outside_mask"
    clean = image.copy()
    clean[mask] = 255 - clean[mask]
    [row] = _stage().process_row(_row(image, clean, mask, "subject_removal"))
    assert row["status"] == LIVE and json.loads(row["scores"])["change_inside"] > 0.2


def test_scores_rank_images_sensibly():
    image, mask = generate_scene(3)
    blurred = (image.astype(np.float32) * 0 + image.mean()).astype(np.uint8)  # flat: no detail at all
    assert image_scores(image, "x")["sharpness_x"] > image_scores(blurred, "x")["sharpness_x"]
    noisy = np.clip(image + np.random.default_rng(0).normal(0, 20, image.shape), 0, 255).astype(np.uint8)
    assert image_scores(noisy, "x")["noise_x"] > image_scores(image, "x")["noise_x"] + 5
    assert quality_score(image) > quality_score(blurred)
    scores = edit_scores(image, image, mask)
    assert scores["change_global"] == scores["change_inside"] == 0.0
    assert abs(scores["mask_area"] - mask.mean()) < 1e-9


def test_the_mean_is_the_same_bits_wherever_the_values_lie_and_equals_its_reference():
    """A score must not depend on the process that computed it (a resumed run's pair json equals the
    uninterrupted run's): the same values at every memory offset give the same mean, equal to the naive one."""
    rng = np.random.default_rng(0)
    for dtype, size in ((np.float32, 1000), (np.float64, 4097), (np.float32, 63), (np.uint8, 777),
                        (np.float32, 512 * 512 + 3)):  # larger than numpy's casting buffers
        values = (rng.normal(size=size) * 100).astype(dtype)
        means = set()
        for offset in range(8):
            buffer = np.zeros(size + 8, dtype)
            buffer[offset:offset + size] = values
            means.add(_mean(buffer[offset:offset + size]))
        assert means == {_mean_reference(values)}
    assert _mean(np.zeros(0)) == 0.0


def test_the_heuristic_score_names_are_the_computed_ones():
    """The names refilter takes as always computed (stages.score.HEURISTIC_SCORES is built from them)."""
    image, mask = generate_scene(3)
    assert list(image_scores(image, "x")) == [f"{name}_x" for name in IMAGE_SCORES]
    assert list(edit_scores(image, image, mask)) == list(EDIT_SCORES)
    assert list(edit_scores(image, image, None)) == list(EDIT_SCORES[:1])


def _twice(image: np.ndarray) -> np.ndarray:
    return cv2.resize(image, (image.shape[1] * 2, image.shape[0] * 2), interpolation=cv2.INTER_NEAREST)


def _round_trip(image: np.ndarray) -> np.ndarray:
    return decode_image(encode_jpeg(image), max_pixels=1 << 28)  # as the edit stage stores it


def test_a_blurred_background_shows_as_lost_detail_not_as_changed_pixels():
    image, mask = generate_scene(3)
    blurred = np.where(mask[..., None], image, cv2.GaussianBlur(image, (0, 0), 8))
    scores = edit_scores(image, _round_trip(blurred), mask)
    assert scores["change_outside"] < 0.03 < 0.5 < scores["detail_change_outside"]
    assert edit_scores(image, _round_trip(image), mask)["detail_change_outside"] < 0.03
    # At twice the size the score is measured at the same analysis scale, so it stays put.
    large = edit_scores(_twice(image), _twice(blurred), _twice(mask.astype(np.uint8)) > 0)
    assert abs(large["detail_change_outside"] - edit_scores(image, blurred, mask)["detail_change_outside"]) < 0.005


def test_a_flat_background_has_no_detail_to_lose():
    image, mask = generate_scene(3)
    flat = np.where(mask[..., None], image, 120).astype(np.uint8)
    assert edit_scores(flat, flat, mask)["detail_change_outside"] == 0.0  # 0/0 without the floor
    assert edit_scores(flat, _round_trip(flat), mask)["detail_change_outside"] < 0.03


def test_a_decompression_bomb_is_rejected_without_allocating_it():
    data = bomb_png()  # 20000 x 20000 pixels claimed in ~50 kB
    tracemalloc.start()
    try:
        decode_image(data, max_pixels=64_000_000)
        raise AssertionError("the bomb was decoded")
    except Rejected as e:
        assert e.reason == "too_many_pixels"
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 20 * 2**20, f"peak {peak / 2**20:.0f} MiB"
