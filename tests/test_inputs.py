"""Hostile-input tests for manifests.inputs (planning, tar/folder reading) and manifests.images (decode/encode)."""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.badinputs import (FIXTURE_MAX_MEMBER_BYTES, FIXTURE_MAX_PIXELS, FOLDER_WARNINGS, TAR_WARNINGS, bad_images,
                       bomb_png, build_bad_folder, build_bad_tar, expected_by_sample_id, good_jpeg, odd_images,
                       outcome_of, raw_png)
from manifests.images import (IMAGE_FORMATS, decode_image, decode_mask, encode_jpeg, encode_mask,
                              encode_png, sha256_hex)
from manifests.inputs import InputUnit, RawSample, make_sample_id, plan_inputs, read_unit
from manifests.raw_sample import IMAGE_EXTENSIONS
from manifests.rejected import Rejected

ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]+-[0-9a-f]{10}$")


def read_all(units: list[InputUnit]) -> list[RawSample]:
    return [s for unit in units for s in read_unit(unit, max_member_bytes=FIXTURE_MAX_MEMBER_BYTES)]


def listing(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def bad_tar(tmp_path_factory: pytest.TempPathFactory) -> tuple[InputUnit, dict[str, str]]:
    path = tmp_path_factory.mktemp("tar") / "bad.tar"
    outcomes = build_bad_tar(path)
    return plan_inputs("webdataset", [str(path)], chunk_size=1)[0], outcomes


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[InputUnit], dict[str, str]]:
    root = tmp_path_factory.mktemp("folder") / "images"
    outcomes = build_bad_folder(root)
    return plan_inputs("folder", [str(root)], chunk_size=4), outcomes


def by_label(samples: list[RawSample], uri: str, labels: dict[str, str]) -> dict[str, RawSample]:
    ids = {make_sample_id(uri, label): label for label in labels}
    return {ids[s.sample_id]: s for s in samples}


# ------------------------------------------------------------------------------------------- fixtures


def test_bad_tar_every_sample_gets_its_outcome(bad_tar: tuple[InputUnit, dict[str, str]]) -> None:
    unit, outcomes = bad_tar
    samples = read_all([unit])
    assert {s.sample_id: outcome_of(s) for s in samples} == expected_by_sample_id(unit.uri, outcomes)
    assert [s.ordinal for s in samples] == list(range(len(samples)))
    for label, sample in by_label(samples, unit.uri, outcomes).items():
        assert (sample.image is None) == (sample.error is not None)
        prefixes = [w.split(":")[0] for w in sample.warnings]
        assert prefixes == ([TAR_WARNINGS[label]] if label in TAR_WARNINGS else []), label


def test_bad_folder_every_sample_gets_its_outcome(bad_folder: tuple[list[InputUnit], dict[str, str]]) -> None:
    units, outcomes = bad_folder
    assert len(units) > 1 and all(len(u.members) <= 4 for u in units)
    samples = read_all(units)
    assert {s.sample_id: outcome_of(s) for s in samples} == expected_by_sample_id(units[0].uri, outcomes)
    for label, sample in by_label(samples, units[0].uri, outcomes).items():
        assert sample.source_uri == f"{units[0].uri}/{label}"
        prefixes = [w.split(":")[0] for w in sample.warnings]
        assert prefixes == ([FOLDER_WARNINGS[label]] if label in FOLDER_WARNINGS else []), label


def test_sidecars_and_captions(bad_tar: tuple[InputUnit, dict[str, str]],
                               bad_folder: tuple[list[InputUnit], dict[str, str]]) -> None:
    unit, outcomes = bad_tar
    tar = by_label(read_all([unit]), unit.uri, outcomes)
    assert tar["good"].meta["url"] == "http://example.com/0.jpg"
    assert tar["good"].caption == "a smooth test pattern"
    assert tar["good"].source_uri == f"{unit.uri}#good"
    assert tar["no_json"].meta == {} and tar["no_json"].caption == "no sidecar json"
    assert tar["bad_json"].meta == {} and tar["json_list"].meta == {}
    assert tar["caption_latin1"].caption == "caf\ufffd"
    assert tar["repeat"].caption == "first" and tar["repeat.2"].meta == {}  # the repeat is not read
    assert tar["sub/dir/nested"].source_uri.endswith("#sub/dir/nested")
    units, outcomes = bad_folder
    folder = by_label(read_all(units), units[0].uri, outcomes)
    assert folder["good.jpg"].meta == {"caption": "folder sample"} and folder["good.jpg"].caption == "folder sample"
    assert folder["photo.v2.jpg"].caption == "the stem keeps its inner dot"
    assert "hidden" not in str(units) and "linkdir" not in str(units) and "notes" not in str(units)


def test_fixtures_are_small_and_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    build_bad_tar(tmp_path / "bad.tar")
    build_bad_folder(tmp_path / "images")
    assert time.perf_counter() - start < 2.0
    assert sum(p.stat().st_size for p in tmp_path.rglob("*") if not p.is_symlink() and p.is_file()) < 3_000_000
    good = decode_image(good_jpeg(512, 640, seed=0), max_pixels=FIXTURE_MAX_PIXELS)
    assert min(good.shape[:2]) >= 512 and len(good_jpeg(512, 640, seed=0)) < 50_000


def test_reading_writes_nothing(tmp_path: Path) -> None:
    tar, root = tmp_path / "bad.tar", tmp_path / "images"
    build_bad_tar(tar)
    build_bad_folder(root)
    before, cwd_before = listing(tmp_path), sorted(os.listdir("."))
    samples = read_all(plan_inputs("webdataset", [str(tar)], 1) + plan_inputs("folder", [str(root)], 3))
    for sample in samples:
        outcome_of(sample)
    assert listing(tmp_path) == before and sorted(os.listdir(".")) == cwd_before
    assert not Path("/abs/evil.jpg").exists()


# ------------------------------------------------------------------------------------------ corrupt tars


def write_good_tar(path: Path, count: int) -> None:
    with tarfile.open(path, "w") as tar:
        for i in range(count):
            for ext, data in (("jpg", good_jpeg(512, 512, i)), ("txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def member_offsets(path: Path) -> list[int]:
    with tarfile.open(path) as tar:
        return [m.offset for m in tar.getmembers()]


@pytest.mark.parametrize("cut", ["half", "at_header", "garbled_header"])
def test_truncated_or_garbled_tar_yields_samples_then_corrupt_tar(tmp_path: Path, cut: str) -> None:
    path = tmp_path / "cut.tar"
    write_good_tar(path, 8)
    data = bytearray(path.read_bytes())
    header = member_offsets(path)[10]  # the header of sample 5's jpg
    if cut == "half":
        data = data[: len(data) // 2]
    elif cut == "at_header":
        data = data[:header]  # a cut on a block boundary looks like a clean end to tarfile
    else:
        data[header:header + 512] = np.random.default_rng(0).integers(0, 256, 512, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    samples = read_all(plan_inputs("webdataset", [str(path)], 1))
    *good, last = samples
    assert 0 < len(good) < 8 and all(outcome_of(s) == "ok" and s.caption for s in good)
    assert last.error is not None and last.error[0] == "corrupt_tar" and last.image is None
    assert last.sample_id == make_sample_id(str(path), "__tar__") and last.ordinal == len(good)


@pytest.mark.parametrize("content", [b"", b"definitely not a tar archive" * 40, None])
def test_unopenable_tar_is_one_corrupt_tar_sample(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "broken.tar"
    if content is not None:
        path.write_bytes(content)
    [sample] = read_all([InputUnit("webdataset", str(path), 0)])
    assert sample.error is not None and sample.error[0] == "corrupt_tar"
    assert ID_PATTERN.match(sample.sample_id) and "broken___tar__" in sample.sample_id


def test_intact_tar_has_no_corrupt_record(tmp_path: Path) -> None:
    write_good_tar(tmp_path / "ok.tar", 3)
    samples = read_all(plan_inputs("webdataset", [str(tmp_path / "ok.tar")], 1))
    assert [outcome_of(s) for s in samples] == ["ok"] * 3


def test_folder_unit_with_missing_or_escaping_members(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(good_jpeg(512, 512, 0))
    (tmp_path / "a.txt").write_bytes(b"")
    (tmp_path / "a.json").write_bytes(b"")
    unit = InputUnit("folder", str(tmp_path), 0, ("a.jpg", "gone.jpg", "../a.jpg", "/etc/passwd"))
    samples = read_all([unit])
    assert [outcome_of(s) for s in samples] == ["ok", "read_error", "unsafe_path", "unsafe_path"]
    assert samples[0].caption == "" and samples[0].warnings[0].startswith("bad_sidecar: invalid JSON")


def image_file(ext: str) -> bytes:
    """A small image in the format Pillow writes for a file extension."""
    buffer = io.BytesIO()
    Image.open(io.BytesIO(good_jpeg(64, 48, 0))).save(buffer, format=Image.registered_extensions()[f".{ext}"])
    return buffer.getvalue()


def animated_gif(frames: int) -> bytes:
    first = Image.open(io.BytesIO(good_jpeg(64, 48, 0)))
    buffer = io.BytesIO()
    first.save(buffer, format="GIF", save_all=True, append_images=[first.rotate(90 * i) for i in range(1, frames)])
    return buffer.getvalue()


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_gif_is_read_from_tars_and_folders_and_decoded(tmp_path: Path) -> None:
    gif = image_file("gif")
    write_tar(tmp_path / "gifs.tar", {"photo.gif": gif, "photo.txt": b"a gif"})
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "photo.gif").write_bytes(gif)
    [tar_unit] = plan_inputs("webdataset", [str(tmp_path / "gifs.tar")], 1)
    [folder_unit] = plan_inputs("folder", [str(tmp_path / "images")], 1)
    assert folder_unit.members == ("photo.gif",)
    samples = read_all([tar_unit, folder_unit])
    assert [outcome_of(s) for s in samples] == ["ok", "ok"] and samples[0].caption == "a gif"


def test_every_extension_the_readers_take_decodes(tmp_path: Path) -> None:
    """The readers and the decoder agree: each reader extension, written as Pillow writes it, is read from
    a tar and from a folder and decodes; each extension names the very format the decoder opens it with."""
    files = {f"img_{ext}.{ext}": image_file(ext) for ext in IMAGE_EXTENSIONS}
    write_tar(tmp_path / "all.tar", files)
    (tmp_path / "images").mkdir()
    for name, data in files.items():
        (tmp_path / "images" / name).write_bytes(data)
    units = plan_inputs("webdataset", [str(tmp_path / "all.tar")], 1)
    units += plan_inputs("folder", [str(tmp_path / "images")], len(files))
    assert [outcome_of(s) for s in read_all(units)] == ["ok"] * 2 * len(files)
    assert {ext: Image.registered_extensions()[f".{ext}"] for ext in IMAGE_FORMATS} == IMAGE_FORMATS


def test_an_animated_gif_gives_its_first_frame_and_says_so() -> None:
    first = decode_image(animated_gif(1), max_pixels=FIXTURE_MAX_PIXELS)
    warnings: list[str] = []
    assert (decode_image(animated_gif(3), max_pixels=FIXTURE_MAX_PIXELS, warnings=warnings) == first).all()
    assert warnings == ["animated_image: a GIF with several frames; the first is used"]


# ---------------------------------------------------------------------------------------- ids and plans


def test_sample_ids_are_dot_free_unique_and_stable(bad_tar: tuple[InputUnit, dict[str, str]],
                                                   bad_folder: tuple[list[InputUnit], dict[str, str]]) -> None:
    units = [bad_tar[0], *bad_folder[0]]
    ids = [s.sample_id for s in read_all(units)]
    assert all(ID_PATTERN.match(i) for i in ids) and len(set(ids)) == len(ids)
    assert ids == [s.sample_id for s in read_all(units)]
    assert make_sample_id("a/b/00001.tar", "000010023") == make_sample_id("a/b/00001.tar", "000010023")
    assert make_sample_id("a/b/00001.tar", "k").startswith("00001_k-")
    assert len({make_sample_id("x/00001.tar", "k"), make_sample_id("y/00001.tar", "k"),
                make_sample_id("x/00001.tar", "k.2"), make_sample_id("x/00001.tar", "k_2")}) == 4
    assert len(make_sample_id("n", "x" * 500)) == 48 + 11


def test_plan_inputs(tmp_path: Path) -> None:
    for name in ("b.tar", "a.tar", "c.parquet", "sub/d.tar", ".hidden.tar"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    units = plan_inputs("webdataset", [str(tmp_path / "*.tar"), str(tmp_path / "sub"), str(tmp_path / "a.tar")], 9)
    assert [(u.uri, u.index) for u in units] == [(str(tmp_path / "a.tar"), 0), (str(tmp_path / "b.tar"), 1),
                                                 (str(tmp_path / "sub" / "d.tar"), 2)]
    assert plan_inputs("webdataset", [str(tmp_path)], 1) == plan_inputs("webdataset", [str(tmp_path)], 1)
    assert len(plan_inputs("webdataset", [str(tmp_path)], 1)) == 3  # directory: its .tar files, not hidden ones

    root = tmp_path / "imgs"
    for name in ("z.jpg", "a.PNG", "m/b.webp", "m/c.txt", ".x.jpg"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    os.symlink(root / "m", root / "linked")
    units = plan_inputs("folder", [str(root)], chunk_size=2)
    assert [u.members for u in units] == [("a.PNG", "m/b.webp"), ("z.jpg",)]
    assert [u.index for u in units] == [0, 1] and all(u.uri == str(root) for u in units)

    for kind, paths in (("webdataset", [str(tmp_path / "nothing*.tar")]), ("folder", [str(tmp_path / "m")]),
                        ("webdataset", [str(tmp_path / "c.parquet")])):
        with pytest.raises(ValueError, match=re.escape(paths[0])):
            plan_inputs(kind, paths, 1)
    with pytest.raises(ValueError, match="kind"):
        plan_inputs("parquet", [str(tmp_path)], 1)


def test_manifests_stay_light() -> None:
    code = ("import sys, manifests.inputs, manifests.images; "
            "print(sorted(m for m in ('torch', 'ray', 'cv2') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).parent.parent)
    assert result.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------- decoding


def test_bad_images_are_rejected_with_their_reason() -> None:
    for name, (_, data, reason) in bad_images().items():
        with pytest.raises(Rejected) as caught:
            decode_image(data, max_pixels=FIXTURE_MAX_PIXELS)
        assert caught.value.reason == reason, (name, caught.value.message)


def test_pixel_limit_is_checked_before_decoding() -> None:
    bomb = bomb_png()
    start = time.perf_counter()
    with pytest.raises(Rejected, match="too_many_pixels"):
        decode_image(bomb, max_pixels=FIXTURE_MAX_PIXELS)
    assert time.perf_counter() - start < 2.0
    # Below Pillow's own guard, our header check must fire (64 MP of zero rows, never decoded).
    rows = bytes(1 + 8000 // 8) * 8000
    start = time.perf_counter()
    with pytest.raises(Rejected, match="max_pixels=50000000"):
        decode_image(raw_png(8000, 8000, zlib.compress(rows)), max_pixels=50_000_000)
    assert time.perf_counter() - start < 2.0


def test_odd_modes_decode_to_correct_rgb() -> None:
    images = {name: decode_image(data, max_pixels=FIXTURE_MAX_PIXELS) for name, (_, data) in odd_images().items()}
    for image in images.values():
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and image.flags.writeable
    assert np.abs(images["cmyk"][100, 100].astype(int) - [255, 0, 0]).max() <= 2
    assert list(images["grey16"][0, 0]) == [200] * 3 and list(images["grey16"][0, -1]) == [255] * 3
    assert list(images["palette_alpha"][0, 0]) == [255, 0, 0]
    assert list(images["palette_alpha"][0, -1]) == [255, 255, 255]  # transparent -> white, not palette blue
    assert np.abs(images["rgba"][5, 5].astype(int) - [127, 127, 255]).max() <= 1  # 50 % blue over white
    grey = images["grey_jpeg"]
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    rotated = images["exif_rot6"]
    assert rotated.shape == (640, 512, 3)  # stored 640 wide x 512 high
    assert rotated[10, -10, 1] < 50 and rotated[10, 10, 1] > 200  # stored top-left marker now top-right


@pytest.mark.parametrize(("mode", "values", "expected"), [
    ("I", [0, 70000, 140000], [0, 128, 255]),  # beyond 16 bits: stretched over the actual range
    ("I", [0, 257 * 100, 65535], [0, 100, 255]),  # 16-bit data in an int32 image
    ("F", [0.0, 0.5, 1.0], [0, 128, 255]),
    ("F", [-1.0, 0.0, 3.0], [0, 64, 255]),
])
def test_high_bit_tiff_scales_without_clipping(mode: str, values: list[float], expected: list[int]) -> None:
    dtype = np.int32 if mode == "I" else np.float32
    row = np.repeat(np.array(values, dtype=dtype), 200)[None, :].repeat(4, axis=0)
    buffer = io.BytesIO()
    Image.fromarray(row).save(buffer, format="TIFF")
    out = decode_image(buffer.getvalue(), max_pixels=FIXTURE_MAX_PIXELS)
    assert list(out[0, ::200, 0]) == expected


@pytest.mark.parametrize(("mode", "color", "expected"), [
    ("1", 1, [255] * 3), ("L", 77, [77] * 3), ("LA", (0, 0), [255] * 3), ("RGB", (1, 2, 3), [1, 2, 3]),
])
def test_simple_modes(mode: str, color: object, expected: list[int]) -> None:
    buffer = io.BytesIO()
    Image.new(mode, (8, 8), color).save(buffer, format="PNG")
    assert list(decode_image(buffer.getvalue(), max_pixels=64)[3, 3]) == expected


# --------------------------------------------------------------------------------------------- encoding


def test_encoders_are_deterministic_and_round_trip() -> None:
    image = decode_image(good_jpeg(512, 512, 3), max_pixels=FIXTURE_MAX_PIXELS)
    jpeg = encode_jpeg(image)
    assert jpeg == encode_jpeg(image.copy()) and sha256_hex(jpeg) == sha256_hex(encode_jpeg(image))
    with Image.open(io.BytesIO(jpeg)) as reopened:
        assert "exif" not in reopened.info and reopened.size == (512, 512)
    assert np.abs(decode_image(jpeg, max_pixels=FIXTURE_MAX_PIXELS).astype(int) - image).mean() < 3
    assert len(encode_jpeg(image, quality=50)) < len(jpeg)
    assert (decode_image(encode_png(image), max_pixels=FIXTURE_MAX_PIXELS) == image).all()
    mask = np.zeros((20, 30), dtype=bool)
    mask[5:10, 3:25] = True
    png = encode_mask(mask)
    with Image.open(io.BytesIO(png)) as reopened:
        assert reopened.mode == "L" and set(np.unique(np.asarray(reopened))) == {0, 255}
    assert (decode_mask(png) == mask).all() and png == encode_mask(mask.copy())
    assert sha256_hex(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    with pytest.raises(ValueError):
        encode_jpeg(image[..., 0])
    with pytest.raises(ValueError):
        encode_mask(mask.astype(np.uint8))
