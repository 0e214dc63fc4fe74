"""The source stage tells the most useful reason: the aspect ratio (no resize can fix it) before the size."""
from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
from PIL import Image

from manifests.schema import LIVE, REJECTED
from stages.base import StageContext
from stages.source import InputConfig, SourceConfig, SourceStage, plan_units
from tests.badinputs import good_jpeg

SIZES = {"panorama.jpg": (4000, 300), "tall.jpg": (300, 1000), "wide.jpg": (4000, 1000),  # aspect > 2.5
         "tiny.jpg": (300, 300), "small.jpg": (600, 300), "fine.jpg": (640, 512)}


def _source_rows(folder: Path) -> dict[str, dict]:
    """{file name: the row the source stage makes of it}, with the default recipe's size checks."""
    cfg = InputConfig(kind="folder", paths=[str(folder)])
    stage = SourceStage((cfg, SourceConfig(min_side=512, max_aspect=2.5)), StageContext(0, "h", "."))
    rows = [row for table in stage(pa.Table.from_pylist(plan_units(cfg))) for row in table.to_pylist()]
    return {row["source_uri"].rsplit("/", 1)[-1]: row for row in rows}


def test_aspect_is_reported_before_size(tmp_path: Path) -> None:
    for name, (w, h) in SIZES.items():
        (tmp_path / name).write_bytes(good_jpeg(w, h, seed=0))
    outcomes = {name: row["reason"] if row["status"] == REJECTED else row["status"]
                for name, row in _source_rows(tmp_path).items()}
    assert outcomes == {"panorama.jpg": "bad_aspect_ratio", "tall.jpg": "bad_aspect_ratio",
                        "wide.jpg": "bad_aspect_ratio", "tiny.jpg": "too_small", "small.jpg": "too_small",
                        "fine.jpg": LIVE}


def test_an_animated_gif_enters_with_its_first_frame_and_a_warning(tmp_path: Path) -> None:
    first = Image.open(io.BytesIO(good_jpeg(640, 512, seed=1)))
    first.save(tmp_path / "clip.gif", save_all=True, append_images=[first.transpose(Image.Transpose.ROTATE_180)])
    [row] = _source_rows(tmp_path).values()
    assert (row["status"], row["width"], row["height"]) == (LIVE, 640, 512)
    assert row["warnings"] == ["animated_image: a GIF with several frames; the first is used"]
