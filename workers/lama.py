"""Inpainting with LaMa as a TorchScript file (big-lama.pt, as lama-cleaner and simple-lama-inpainting ship it:
`forward(image, mask)`, image (B, 3, H, W) in 0..1, mask (B, 1, H, W) in {0, 1}, sides a multiple of 8), and the
reference's mask preparation around it (reference-code.md §1.3): dilate the (bool) mask with a 12×12 kernel
twice, pad to a multiple of 8.

LaMa runs in float32 whatever the recipe's dtype: its Fourier convolutions (torch.fft) take half precision only
at power-of-two sizes on CUDA, and the model is small (51 M parameters). The inpainted pixels are pasted into the
original through the hole, so everything outside it is the input byte for byte (big-lama already composites,
but in 0..1 floats, which can move an 8-bit pixel by one level).
"""
from __future__ import annotations

import hashlib
from functools import partial
from pathlib import Path

import cv2
import numpy as np

from manifests.rejected import ItemFailed, Rejected
from workers.model_lifecycle import LazyModel, need, pick_device, resolve_model, run_batched

LAMA_FILE = "big-lama.pt"  # the TorchScript file name lama-cleaner and simple-lama-inpainting use
MULTIPLE = 8  # LaMa downsamples three times


def dilate(mask: np.ndarray, kernel: int, iterations: int) -> np.ndarray:
    """A bool mask grown by a square `kernel`×`kernel` structuring element, `iterations` times (the reference's
    `cv2.dilate(mask, np.ones((12, 12)), iterations=2)`)."""
    return cv2.dilate(mask.astype(np.uint8), np.ones((kernel, kernel), np.uint8), iterations=iterations) > 0


def padded_size(height: int, width: int) -> tuple[int, int]:
    return -(-height // MULTIPLE) * MULTIPLE, -(-width // MULTIPLE) * MULTIPLE


def lama_file(lama: str) -> Path:
    """A TorchScript file as is; else a folder (a hub id in the local cache, `tiny:lama`) holding big-lama.pt."""
    path = Path(lama).expanduser()
    if path.is_file():
        return path
    file = resolve_model(lama).path / LAMA_FILE
    if not file.is_file():
        raise FileNotFoundError(f"LaMa {lama!r}: no {LAMA_FILE} in {file.parent}")
    return file


class LamaInpainter:
    def __init__(self, lama: str, batch_size: int) -> None:
        """Loads nothing: the TorchScript file loads on the first `inpaint`."""
        self.lama, self.batch_size = lama, batch_size
        self._file: Path | None = None
        self._sha256: str | None = None
        self._model = LazyModel(self._load)

    def _load(self):
        torch = need("torch")
        self._file = lama_file(self.lama)
        self._sha256 = hashlib.sha256(self._file.read_bytes()).hexdigest()[:16]  # its revision: which weights
        device = pick_device()
        return torch.jit.load(str(self._file), map_location=device).eval(), device

    def inpaint(self, images: list[np.ndarray],
                holes: list[np.ndarray]) -> list[np.ndarray | Rejected | ItemFailed]:
        """Each RGB uint8 image with its bool hole filled, in order; images of one padded size share batches."""
        model, device = self._model.get()
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(padded_size(*image.shape[:2]), []).append(i)
        done: dict[int, np.ndarray | Rejected | ItemFailed] = {}
        for indices in by_size.values():
            run = partial(self._run, model, device, images, holes)
            done.update(zip(indices, run_batched(run, indices, self.batch_size)))
        return [done[i] for i in range(len(images))]

    def _run(self, model, device: str, images: list[np.ndarray], holes: list[np.ndarray],
             chunk: list[int]) -> list[np.ndarray | Rejected]:
        """One forward pass over the pairs `chunk` indexes, whose images share a padded size."""
        torch = need("torch")
        height, width = images[chunk[0]].shape[:2]
        ph, pw = padded_size(height, width)
        pad = ((0, ph - height), (0, pw - width))
        # Symmetric padding, as lama-cleaner pads: the model sees continued content, not a black border.
        image = np.stack([np.pad(images[i], pad + ((0, 0),), mode="symmetric") for i in chunk])
        hole = np.stack([np.pad(holes[i], pad, mode="symmetric") for i in chunk])
        image_t = torch.from_numpy(image).to(device).permute(0, 3, 1, 2).float() / 255
        hole_t = torch.from_numpy(hole).to(device)[:, None].float()
        with torch.inference_mode():
            out = model(image_t, hole_t)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(image_t.shape):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            reason = Rejected("inpaint_unreadable", f"LaMa returned {shape} for {tuple(image_t.shape)}")
            return [reason] * len(chunk)
        out = out.float().permute(0, 2, 3, 1)[:, :height, :width].cpu().numpy()
        results: list[np.ndarray | Rejected] = []
        for k, i in enumerate(chunk):
            if not np.isfinite(out[k]).all():
                results.append(Rejected("inpaint_unreadable", "LaMa returned non-finite pixels"))
                continue
            filled = images[i].copy()
            filled[holes[i]] = (np.clip(out[k], 0, 1) * 255).round().astype(np.uint8)[holes[i]]
            results.append(filled)
        return results

    @property
    def load_seconds(self) -> float | None:
        return self._model.load_seconds

    def provenance(self) -> dict:
        loaded = self._model.model
        return {"model": self.lama, "file": self._file and str(self._file), "sha256": self._sha256,
                "dtype": "float32", "device": loaded[1] if loaded else None,
                "format": "torchscript forward(image, mask)", "pad_multiple": MULTIPLE}
