"""Position ids of the target and reference tokens in the two layouts (trainer/model.py)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from trainer.model import EditModel  # noqa: E402

FLUX_VAE = 8  # FLUX.1's VAE: one latent row per 8 pixel rows, one token row per 2 latent rows


def _ids(layout: str, resolution: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(target ids, reference ids) of an image of height × width pixels, each (rows, cols, 3)."""
    model = EditModel(SimpleNamespace(transformer=None, vae_scale_factor=FLUX_VAE), layout, resolution=resolution)
    h, w = height // FLUX_VAE, width // FLUX_VAE
    ids = model.image_ids(h, w).view(2, h // 2, w // 2, 3)
    return ids[0], ids[1]


@pytest.mark.parametrize(("resolution", "height", "width", "offset"), [
    (512, 512, 512, 64), (1024, 1024, 1024, 128), (1024, 720, 1456, 128), (1024, 1456, 720, 128)])
def test_row_offset_shifts_the_reference_as_the_reference_code_does(resolution, height, width, offset):
    """reference-code.md §3.4: `--offset 64` at 512 px, `--offset 128` at 1024 px (the 1024 launcher's value
    for every aspect bucket), so the reference's rows start below the target's last row."""
    target, reference = _ids("row_offset", resolution, height, width)
    rows, cols = height // 16, width // 16
    assert torch.equal(target[..., 1], torch.arange(rows).float()[:, None].expand(rows, cols))
    assert torch.equal(target[..., 2], torch.arange(cols).float()[None, :].expand(rows, cols))
    assert torch.equal(reference[..., 1], target[..., 1] + offset)
    assert torch.equal(reference[..., 2], target[..., 2])
    assert (target[..., 0] == 0).all() and (reference[..., 0] == 0).all()
    assert reference[..., 1].min() > target[..., 1].max()


def test_kontext_puts_the_reference_on_index_1_over_the_same_grid():
    target, reference = _ids("kontext", 512, 512, 512)
    assert (target[..., 0] == 0).all() and (reference[..., 0] == 1).all()
    assert torch.equal(reference[..., 1:], target[..., 1:])
