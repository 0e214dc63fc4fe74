"""Tests of the classical CPU workers: segmentation, sample images and every edit op."""
from __future__ import annotations

import io
import json
import re

import cv2
import numpy as np
import pytest
from PIL import Image

from manifests.taxonomy import TASKS
from workers.base import COLOR_WORDS, POSITION_WORDS, Subject
from workers.classical import OPS, TASKS_COVERED, VERSION, ops_for_task, versions
from workers.classical_region import CHROMATIC_HUES
from workers.sample_images import SCENE_SIZES, generate_scene, list_samples, load_sample
from workers.segment_classical import color_word, describe_subject, find_subject

EXPECTED_OPS = {
    "style_change": {"style.watercolor", "style.pencil", "style.color_pencil", "style.oil", "style.cartoon"},
    "tone_transformation": {"tone.warm", "tone.cool", "tone.night", "tone.day", "tone.vintage"},
    "camera_movement": {"camera.zoom_in", "camera.zoom_out", "camera.pan", "camera.rotate",
                        "camera.perspective"},
    "low_level": {"low_level.edges_to_photo"},
    "background_change": {"background.blur", "background.replace"},
    "color_change": {"color.recolor"},
    "subject_removal": {"removal.inpaint"},
    "subject_addition": {"addition.reverse_inpaint"},
}
REVERSED_OPS = {"camera.zoom_out", "low_level.edges_to_photo", "addition.reverse_inpaint"}
BACKGROUND_OPS = {"background.blur", "background.replace"}  # they edit everything but the subject mask


def _small(image: np.ndarray) -> np.ndarray:
    return cv2.resize(image, (image.shape[1] // 3, image.shape[0] // 3), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def scene() -> tuple[np.ndarray, Subject]:
    """A small generated scene and its subject: fast inputs for every op."""
    image = _small(generate_scene(3)[0])
    subject = find_subject(image)
    assert subject is not None
    return image, subject


def _params(op_name: str, subject: Subject, seed: int = 0) -> dict:
    params = OPS[op_name].sample_params(np.random.default_rng(seed), subject)
    assert params is not None, op_name
    return params


def _mean_diff(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float:
    diff = np.abs(a.astype(np.float32) - b.astype(np.float32)).mean(axis=2) / 255
    return float(diff.mean() if where is None else diff[where].mean())


def _ramp(horizontal: bool, h: int = 96, w: int = 144) -> np.ndarray:
    """Grey image that brightens left → right (or top → bottom): shows which way the view moved."""
    ramp = np.linspace(0, 255, w if horizontal else h, dtype=np.float32)
    grid = np.broadcast_to(ramp[None, :] if horizontal else ramp[:, None], (h, w))
    return np.repeat(grid[..., None], 3, axis=2).round().astype(np.uint8)


# --- registry -----------------------------------------------------------------------------------------------

def test_registry_covers_exactly_the_eight_tasks():
    assert TASKS_COVERED == frozenset(EXPECTED_OPS)
    assert TASKS_COVERED <= {task.name for task in TASKS}
    for task, names in EXPECTED_OPS.items():
        assert {op.name for op in ops_for_task(task)} == names
    assert ops_for_task("text_change") == []
    assert set(OPS) == set().union(*EXPECTED_OPS.values())
    assert VERSION == "classical-1"
    assert {"classical", "opencv", "scikit-image"} <= set(versions())


def test_params_are_json_and_in_range(scene):
    _, subject = scene
    ranges = {"strength": (20, 60), "factor": (20, 60), "amount": (10, 25), "angle": (5, 20),
              "sigma": (6, 16)}
    for name, op in OPS.items():
        for seed in range(20):
            params = op.sample_params(np.random.default_rng(seed), subject)
            assert json.loads(json.dumps(params)) == params
            assert params == op.sample_params(np.random.default_rng(seed), subject)
            for key, value in params.items():
                if key in ranges:
                    assert isinstance(value, int) and ranges[key][0] <= value <= ranges[key][1], (name, params)
    assert {_params("camera.pan", subject, s)["direction"] for s in range(40)} == {"left", "right", "up", "down"}
    assert _params("background.replace", subject)["backdrop"] in set(COLOR_WORDS) - {subject.color}
    assert _params("color.recolor", subject)["target"] in set(CHROMATIC_HUES) - {subject.color}


def test_subject_ops_need_a_subject():
    for name, op in OPS.items():
        assert op.needs_subject == (op.sample_params(np.random.default_rng(0), None) is None), name


def test_recolor_refuses_grey_or_dull_subjects(scene):
    _, subject = scene
    grey = Subject(mask=subject.mask, area_frac=subject.area_frac, bbox=subject.bbox, color="gray",
                   where=subject.where, saturation=0.05)
    dull_red = Subject(mask=subject.mask, area_frac=subject.area_frac, bbox=subject.bbox, color="red",
                       where=subject.where, saturation=0.1)
    recolor = OPS["color.recolor"]
    assert recolor.sample_params(np.random.default_rng(0), grey) is None
    assert recolor.sample_params(np.random.default_rng(0), dull_red) is None


# --- every op -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(OPS))
def test_op_changes_image_keeps_size_and_is_deterministic(scene, name):
    image, subject = scene
    op = OPS[name]
    params = _params(name, subject)
    out = op.apply(image, params, subject)
    again = op.apply(image, params, subject)
    for picture in (out.source, out.edited):
        assert picture.shape == image.shape and picture.dtype == np.uint8
    assert np.array_equal(out.source, again.source) and np.array_equal(out.edited, again.edited)
    if name in REVERSED_OPS:
        assert np.array_equal(out.edited, image)  # the real photograph is the target
        assert not np.array_equal(out.source, image)
    elif name == "camera.pan":  # two equally zoomed views of the photo, neither is the photo itself
        assert not np.array_equal(out.source, image) and not np.array_equal(out.edited, image)
    else:
        assert np.array_equal(out.source, image)
    if not op.needs_subject:
        assert out.mask is None
        assert _mean_diff(out.source, out.edited) > 2 / 255
        return
    assert out.mask is not None and out.mask.shape == image.shape[:2] and out.mask.dtype == bool
    inside = _mean_diff(out.source, out.edited, out.mask)
    outside = _mean_diff(out.source, out.edited, ~out.mask)
    if name in BACKGROUND_OPS:
        inside, outside = outside, inside  # their mask is the subject they keep
    assert inside > 2 / 255 and inside > 5 * outside, (inside, outside)


def test_reverse_inpaint_is_removal_reversed(scene):
    image, subject = scene
    removal = OPS["removal.inpaint"].apply(image, {}, subject)
    addition = OPS["addition.reverse_inpaint"].apply(image, {}, subject)
    assert np.array_equal(addition.source, removal.edited)
    assert np.array_equal(addition.mask, removal.mask)
    assert removal.mask[subject.mask].all() and removal.mask.sum() > subject.mask.sum()  # dilated


def test_zoom_out_source_is_the_zoom_in(scene):
    image, subject = scene
    params = {"factor": 40}
    assert np.array_equal(OPS["camera.zoom_out"].apply(image, params, None).source,
                          OPS["camera.zoom_in"].apply(image, params, None).edited)


def test_removal_makes_the_subject_look_like_its_surroundings(scene):
    image, subject = scene
    out = OPS["removal.inpaint"].apply(image, {}, subject)
    ring = cv2.dilate(out.mask.astype(np.uint8), np.ones((15, 15), np.uint8)).astype(bool) & ~out.mask
    ring_colour = image[ring].astype(np.float32).mean(0)
    before = np.abs(image[subject.mask].astype(np.float32).mean(0) - ring_colour).mean()
    after = np.abs(out.edited[subject.mask].astype(np.float32).mean(0) - ring_colour).mean()
    assert after < 0.3 * before


def test_recolor_gives_the_target_colour_word(scene):
    image, subject = scene
    for target in set(CHROMATIC_HUES) - {subject.color}:
        edited = OPS["color.recolor"].apply(image, {"target": target}, subject).edited
        assert color_word(edited[subject.mask]) == target


# --- directions say what the ops do -------------------------------------------------------------------------

@pytest.mark.parametrize("direction,horizontal,darker", [
    ("left", True, True), ("right", True, False), ("up", False, True), ("down", False, False)])
def test_pan_moves_the_view_that_way(direction, horizontal, darker):
    image = _ramp(horizontal)
    out = OPS["camera.pan"].apply(image, {"direction": direction, "amount": 20}, None)
    change = out.edited.mean() - out.source.mean()
    assert (change < -5) == darker and abs(change) > 5


@pytest.mark.parametrize("direction", ["left", "right"])
def test_perspective_turns_that_way(direction):
    image = _ramp(horizontal=True)  # the left of the scene is dark: turning left shows more of it
    edited = OPS["camera.perspective"].apply(image, {"direction": direction}, None).edited
    assert (edited.mean() < image.mean()) == (direction == "left")
    assert edited.min() < 80 if direction == "left" else edited.max() > 175  # no empty border, real content


@pytest.mark.parametrize("direction", ["clockwise", "counterclockwise"])
def test_rotate_turns_that_way_without_empty_corners(direction):
    image = _ramp(horizontal=True) // 2 + 100  # no black in the image: black would be an empty border
    edited = OPS["camera.rotate"].apply(image, {"direction": direction, "angle": 15}, None).edited
    # Clockwise, the dark left side swings up: the top half becomes darker than the bottom half.
    top, bottom = edited[: edited.shape[0] // 2].mean(), edited[edited.shape[0] // 2:].mean()
    assert (top < bottom) == (direction == "clockwise")
    assert edited.min() >= 95


def test_tone_ops_move_colours_the_named_way(scene):
    image, _ = scene
    r, b = image[..., 0].mean(), image[..., 2].mean()
    warm = OPS["tone.warm"].apply(image, {"strength": 40}, None).edited
    cool = OPS["tone.cool"].apply(image, {"strength": 40}, None).edited
    night = OPS["tone.night"].apply(image, {}, None).edited
    day = OPS["tone.day"].apply(night, {}, None).edited
    assert warm[..., 0].mean() - warm[..., 2].mean() > r - b + 10
    assert cool[..., 0].mean() - cool[..., 2].mean() < r - b - 10
    assert night.mean() < 0.6 * image.mean() and night[..., 2].mean() > night[..., 0].mean()
    assert day.mean() > 1.5 * night.mean()


def test_edge_map_is_white_edges_on_black(scene):
    image, _ = scene
    edges = OPS["low_level.edges_to_photo"].apply(image, {}, None).source
    assert set(np.unique(edges)) <= {0, 255} and 0.005 < (edges > 0).mean() < 0.3
    assert (edges[..., 0] == edges[..., 2]).all()


# --- segmentation -------------------------------------------------------------------------------------------

def test_find_subject_recovers_generated_objects():
    hits = 0
    for index in range(20):
        image, truth = generate_scene(index)
        subject = find_subject(image)
        if subject is None:
            continue
        iou = (subject.mask & truth).sum() / (subject.mask | truth).sum()
        hits += iou > 0.6
        assert subject.color in COLOR_WORDS and subject.where in POSITION_WORDS
        assert 0 <= subject.saturation <= 1 and subject.area_frac == pytest.approx(subject.mask.mean())
    assert hits >= 16


def test_find_subject_is_deterministic(scene):
    image, subject = scene
    again = find_subject(image)
    assert np.array_equal(again.mask, subject.mask) and again.color == subject.color


@pytest.mark.parametrize("shape", [(64, 96, 3), (512, 768, 3), (7, 5, 3)])
def test_find_subject_on_flat_or_tiny_images(shape):
    subject = find_subject(np.full(shape, 128, np.uint8))
    assert subject is None or subject.area_frac > 0.5
    noisy = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    subject = find_subject(noisy)  # must not crash; any answer is acceptable for noise
    assert subject is None or subject.mask.shape == shape[:2]


def test_describe_subject_words():
    image = np.zeros((90, 90, 3), np.uint8)
    image[60:90, 0:30] = (30, 60, 220)  # a blue square in the bottom-left cell
    mask = np.zeros((90, 90), bool)
    mask[60:90, 0:30] = True
    subject = describe_subject(image, mask)
    assert (subject.color, subject.where, subject.bbox) == ("blue", "bottom left", (0, 60, 30, 90))
    assert subject.saturation > 0.8
    assert color_word(np.array([[250, 250, 250], [250, 250, 250], [10, 10, 10]], np.uint8)) == "white"


# --- sample images ------------------------------------------------------------------------------------------

def test_list_samples_is_sorted_and_named_plainly():
    names = list_samples(3)
    assert names == sorted(names) == list_samples(3)
    assert {"scene-0000", "scene-0001", "scene-0002", "skimage-astronaut", "skimage-coffee"} <= set(names)
    assert "scene-0003" not in names
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)+", name) for name in names)


def test_every_sample_decodes_deterministically():
    for name in list_samples(2):
        data = load_sample(name)
        assert data == load_sample(name)
        with Image.open(io.BytesIO(data)) as decoded:
            assert decoded.mode == "RGB" and min(decoded.size) > 0
    for bad in ("nowhere-0001", "scene-x", "skimage-lily-of-the-valley"):
        with pytest.raises(KeyError):
            load_sample(bad)


def test_scenes_are_deterministic_and_sized():
    for index in range(6):
        image, mask = generate_scene(index)
        again, mask_again = generate_scene(index)
        assert np.array_equal(image, again) and np.array_equal(mask, mask_again)
        assert image.shape[:2] in SCENE_SIZES and image.dtype == np.uint8 and mask.dtype == bool
        assert 0.03 <= mask.mean() <= 0.25
    assert not np.array_equal(generate_scene(0)[0][:64, :64], generate_scene(1)[0][:64, :64])
