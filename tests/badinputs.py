"""Hostile-input fixtures: an img2dataset-style tar and an image folder mixing good and bad samples.

`build_bad_tar` / `build_bad_folder` return {label: expected outcome}, where the outcome is "ok" or the
reason code that reading (RawSample.error) or decoding (Rejected.reason) must give. Labels are the ids'
keys: `make_sample_id(unit.uri, label)` is the sample's id (`expected_by_sample_id` does this), so a test
can match results by sample_id. For tars the label is the member key ("KEY.N" for the N-th repeat of a
key), for folders the file path relative to the folder. TAR_WARNINGS / FOLDER_WARNINGS give the warning
prefix expected on some samples. Read with FIXTURE_MAX_MEMBER_BYTES and decode with FIXTURE_MAX_PIXELS.
"""
from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from manifests.images import decode_image
from manifests.inputs import RawSample, make_sample_id
from manifests.rejected import Rejected

FIXTURE_MAX_PIXELS = 40_000_000
FIXTURE_MAX_MEMBER_BYTES = 300_000

TAR_WARNINGS = {
    "multi": "multiple_images",
    "bad_json": "bad_sidecar",
    "json_list": "bad_sidecar",
    "json_not_utf8": "bad_sidecar",
    "json_deep": "bad_sidecar",
    "caption_latin1": "caption_not_utf8",
}
FOLDER_WARNINGS = {
    "bad_json.jpg": "bad_sidecar",
    "latin1.jpg": "caption_not_utf8",
    "sidecar_escape.jpg": "bad_sidecar",
}


def good_jpeg(w: int, h: int, seed: int) -> bytes:
    """Smooth random colour waves: full resolution but only ~20 kB as JPEG."""
    rng = np.random.default_rng(seed)
    y, x = np.ogrid[0:h // 8, 0:w // 8]  # drawn at 1/8 size and upscaled: smooth anyway, and fast
    freq, phase = rng.uniform(0.5, 3.0, (3, 2)) / (max(w, h) // 8), rng.uniform(0, 2 * np.pi, 3)
    channels = [127 + 100 * np.sin(2 * np.pi * (fx * x + fy * y) + p) for (fx, fy), p in zip(freq, phase)]
    small = Image.fromarray(np.stack(channels, axis=2).astype(np.uint8))
    return _encode(small.resize((w, h), Image.Resampling.BILINEAR), "JPEG", quality=90)


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def raw_png(width: int, height: int, idat: bytes, bit_depth: int = 1) -> bytes:
    """A greyscale PNG assembled by hand, so headers can claim anything."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def bomb_png() -> bytes:
    """A 20000 x 20000 1-bit PNG of zero rows: 400 megapixels in ~50 kB."""
    packer = zlib.compressobj(9)
    thousand_rows = bytes(1 + 20000 // 8) * 1000  # each row: filter byte 0 + 2500 bytes of packed bits
    return raw_png(20000, 20000, b"".join(packer.compress(thousand_rows) for _ in range(20)) + packer.flush())


def odd_images() -> dict[str, tuple[str, bytes]]:
    """{name: (extension, bytes)} of decodable images in unusual modes (checked pixel by pixel in tests)."""
    w, h = 640, 512
    half = np.zeros((h, w), dtype=np.uint16)
    half[:, : w // 2], half[:, w // 2:] = 200 * 257, 65535  # 16-bit values that must scale to 200 and 255
    palette = Image.new("P", (w, h), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255])
    palette.paste(1, (w // 2, 0, w, h))  # right half: palette entry 1, fully transparent
    rotated = Image.new("RGB", (w, h), (255, 255, 255))
    rotated.paste((255, 0, 0), (0, 0, 64, 64))  # stored top-left; orientation 6 shows it top-right
    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "cmyk": ("jpg", _encode(Image.new("CMYK", (w, h), (0, 255, 255, 0)), "JPEG")),  # red
        "grey16": ("png", _encode(Image.fromarray(half), "PNG")),
        "palette_alpha": ("png", _encode(palette, "PNG", transparency=1)),
        "rgba": ("png", _encode(Image.new("RGBA", (w, h), (0, 0, 255, 128)), "PNG")),
        "grey_jpeg": ("jpg", _encode(Image.linear_gradient("L").resize((w, h)), "JPEG")),
        "exif_rot6": ("jpg", _encode(rotated, "JPEG", exif=exif.tobytes())),
    }


def bad_images() -> dict[str, tuple[str, bytes, str]]:
    """{name: (extension, bytes, expected reason)} of images that decode_image must reject."""
    good = good_jpeg(640, 512, seed=99)
    return {
        "corrupt": ("jpg", np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes(),
                    "not_an_image"),
        "truncated": ("jpg", good[: len(good) * 6 // 10], "truncated_image"),
        "empty": ("jpg", b"", "empty_file"),
        "text_as_png": ("png", b"this is a text file, not a PNG\n" * 20, "not_an_image"),
        "bomb": ("png", bomb_png(), "too_many_pixels"),
        "bad_zlib": ("png", raw_png(600, 600, b"\x78\x9c" + b"not a deflate stream" * 10, 8), "decode_error"),
        "lab": ("tif", _encode(Image.new("LAB", (64, 64), (50, 0, 0)), "TIFF"), "unsupported_mode"),
    }


class _TarBuilder:
    def __init__(self, tar: tarfile.TarFile) -> None:
        self.tar = tar
        self.outcomes: dict[str, str] = {}

    def add(self, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
        info = tarfile.TarInfo(name)  # mtime 0, no owner: the fixture is byte-for-byte reproducible
        info.type, info.linkname, info.size = kind, link, len(data)
        self.tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

    def sample(self, label: str, outcome: str, **members: bytes) -> None:
        for ext, data in members.items():
            self.add(f"{label}.{ext}", data)
        self.outcomes[label] = outcome


def build_bad_tar(path: Path) -> dict[str, str]:
    """Write the hostile tar to `path`; return {label: "ok" | reason code}."""
    # GNU format with surrogateescape writes names byte-for-byte, including one that is not UTF-8.
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tar:
        b = _TarBuilder(tar)
        meta = json.dumps({"caption": "a smooth test pattern", "url": "http://example.com/0.jpg"}).encode()
        b.sample("good", "ok", jpg=good_jpeg(640, 512, 0), json=meta, txt=b"a smooth test pattern")
        b.sample("no_json", "ok", jpg=good_jpeg(512, 512, 1), txt=b"no sidecar json")
        b.sample("upper", "ok", JPG=good_jpeg(512, 600, 2))
        b.sample("multi", "ok", png=_encode(Image.new("RGB", (512, 512)), "PNG"), jpg=good_jpeg(512, 512, 3))
        b.sample("sub/dir/nested", "ok", jpg=good_jpeg(512, 512, 4))
        b.sample("caf\udce9", "ok", jpg=good_jpeg(512, 512, 5))  # member name with a non-UTF-8 byte
        for label, (ext, data) in odd_images().items():
            b.sample(label, "ok", **{ext: data})
        for label, (ext, data, reason) in bad_images().items():
            b.sample(label, reason, **{ext: data})
        for label, sidecar in [("bad_json", b"{not json"), ("json_list", b"[1, 2]"),
                               ("json_not_utf8", b'{"caption": "caf\xe9"}'), ("json_deep", b"[" * 100_000)]:
            b.sample(label, "ok", jpg=good_jpeg(512, 512, 6), json=sidecar)
        b.sample("caption_latin1", "ok", jpg=good_jpeg(512, 512, 7), txt="café".encode("latin-1"))
        b.sample("too_large", "member_too_large", jpg=bytes(FIXTURE_MAX_MEMBER_BYTES + 1))
        b.sample("dup_member", "duplicate_member", jpg=good_jpeg(512, 512, 8))
        b.add("dup_member.jpg", good_jpeg(512, 512, 9))
        b.sample("../escape", "unsafe_member_name", jpg=good_jpeg(512, 512, 10))
        b.sample("/abs/evil", "unsafe_member_name", jpg=good_jpeg(512, 512, 11))
        b.add("symlink.jpg", kind=tarfile.SYMTYPE, link="/etc/passwd")
        b.add("hardlink.jpg", kind=tarfile.LNKTYPE, link="good.jpg")
        b.outcomes.update(symlink="not_a_regular_file", hardlink="not_a_regular_file")
        b.add("somedir.d", kind=tarfile.DIRTYPE)  # skipped: directories are no samples
        b.add("README", b"no extension: belongs to no sample")
        b.sample("only_json", "no_image", json=meta)
        b.sample("repeat", "ok", jpg=good_jpeg(512, 512, 12), txt=b"first")
        b.sample("between", "ok", jpg=good_jpeg(512, 512, 13))
        b.add("repeat.json", meta)  # the key comes back after another sample
        b.outcomes["repeat.2"] = "duplicate_key"
    return b.outcomes


def build_bad_folder(path: Path) -> dict[str, str]:
    """Create the hostile image folder at `path`; return {relative file path: "ok" | reason code}."""
    path.mkdir(parents=True)
    outcomes: dict[str, str] = {}

    def put(rel: str, data: bytes, outcome: str | None = None) -> None:
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
        if outcome is not None:
            outcomes[rel] = outcome

    put("good.jpg", good_jpeg(640, 512, 20), "ok")
    put("good.json", json.dumps({"caption": "folder sample"}).encode())
    put("good.txt", b"folder sample")
    bad = bad_images()
    put("sub/nested.png", odd_images()["rgba"][1], "ok")
    put("dup.jpg", good_jpeg(512, 512, 21), "ok")  # same stem, two images: two samples
    put("dup.png", _encode(Image.new("RGB", (512, 512), (0, 128, 0)), "PNG"), "ok")
    put("photo.v2.jpg", good_jpeg(512, 512, 22), "ok")
    put("photo.v2.txt", b"the stem keeps its inner dot")
    put("UPPER.JPG", good_jpeg(512, 512, 23), "ok")
    put(".hidden.jpg", good_jpeg(512, 512, 24))  # hidden: not listed
    put(".hiddendir/inside.jpg", good_jpeg(512, 512, 25))
    put("notes.txt", b"not an image: not listed")
    for name in ("empty", "text_as_png", "truncated"):
        ext, data, reason = bad[name]
        put(f"{name}.{ext}", data, reason)
    put("bad_json.jpg", good_jpeg(512, 512, 26), "ok")
    put("bad_json.json", b"[1")
    put("latin1.jpg", good_jpeg(512, 512, 27), "ok")
    put("latin1.txt", "légende".encode("latin-1"))
    put("too_large.jpg", bytes(FIXTURE_MAX_MEMBER_BYTES + 1), "member_too_large")
    put("sidecar_escape.jpg", good_jpeg(512, 512, 28), "ok")
    os.symlink("/etc/passwd", path / "sidecar_escape.json")
    os.symlink("good.jpg", path / "link_inside.jpg")
    os.symlink("/etc/passwd", path / "link_outside.jpg")
    os.symlink("../outside.jpg", path / "link_up.jpg")  # dangling and outside: never opened
    os.symlink("sub", path / "linkdir")  # a symlinked directory is not entered
    os.mkfifo(path / "fifo.jpg")  # opening it for reading would block a naive reader forever
    outcomes.update({"link_inside.jpg": "ok", "link_outside.jpg": "unsafe_path", "link_up.jpg": "unsafe_path",
                     "fifo.jpg": "not_a_regular_file"})
    return outcomes


def expected_by_sample_id(uri: str, outcomes: dict[str, str]) -> dict[str, str]:
    """Re-key a fixture's outcomes by the sample ids that reading `uri` (the unit's uri) produces."""
    return {make_sample_id(uri, label): outcome for label, outcome in outcomes.items()}


def outcome_of(sample: RawSample, max_pixels: int = FIXTURE_MAX_PIXELS) -> str:
    """"ok" or the reason code, after reading and decoding, as the fixtures state it."""
    if sample.error is not None:
        return sample.error[0]
    assert sample.image is not None
    try:
        decode_image(sample.image, max_pixels=max_pixels)
    except Rejected as exc:
        return exc.reason
    return "ok"
