"""The pyiqa side of filters/pyiqa_scorer.py. It runs in the isolated pyiqa environment (`make pyiqa-env`),
never in the project's, and imports nothing of the project: only the standard library, numpy, torch and pyiqa.

    .venv/pyiqa/bin/python -I filters/pyiqa_worker.py                   # serves pyiqa_scorer on stdin/stdout
    .venv/pyiqa/bin/python -I filters/pyiqa_worker.py --write-tiny DIR  # tiny random weights in pyiqa's layout

Protocol, one request at a time:
    start    → one JSON line {metrics, weights, weights_dir, device, batch_images, seed}
             ← one JSON line {"ready": provenance} once every metric is built; or the process exits non-zero
               with its traceback on stderr
    request  → one JSON line {"images": n}, then n frames: 8-byte little-endian length + .npy bytes of an RGB
               uint8 (H, W, 3) array
             ← one JSON line {"scores": {metric: [value, ...]}}, a value a float or a code for that image:
               "oom" (CUDA out of memory alone) or "too_small" (LIQE needs both sides ≥ 224 px); or {"error": "…"}
pyiqa prints to stdout, so fd 1 is moved onto stderr and the protocol writes to a private copy of it. Before each
forward pass a line "pyiqa_worker: scoring METRIC …" on stderr tells the parent which metric a crash hit.

Weights (`weights`):
- pretrained: pyiqa's own files, found the way pyiqa finds them, in torch's hub folder (`weights_dir`, else
  $TORCH_HOME/hub or ~/.cache/torch/hub): pyiqa/liqe_mix.pt, pyiqa/CLIP-IQA%2B_learned_prompts-603f3273.pth (the
  name pyiqa takes from its URL, "+" escaped), and OpenAI CLIP's clip/ViT-B-32.pt (LIQE) and clip/RN50.pt
  (CLIP-IQA+, whose own file holds the learned prompts only).
  Missing files fail the start, named; nothing is ever downloaded. The CLIP file (OpenAI's TorchScript archive)
  goes to pyiqa's `load` by path, which skips its re-hash-or-download step; provenance has every file's sha256.
- random / tiny: the same pyiqa classes with pyiqa's own `CLIP` class at random weights (seeded) in place of
  the OpenAI download; `random` at OpenAI's sizes (benchmarks; LIQE's 495 prompt encodings take about a minute on
  two CPU cores), `tiny` shrunk (tests).
LIQE caches its prompts' text features (pyiqa/liqe_text_feat_mix.pt, computed from the model on first build):
they are built in a private folder and published into `weights_dir` by an atomic rename, so parallel workers
never read a half-written file and a read-only weights folder still works.
"""
from __future__ import annotations

import atexit
import hashlib
import io
import json
import os
import shutil
import struct
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch

# OpenAI's CLIP shapes, as pyiqa's clip_model.build_model reads them from the published checkpoints.
_TEXT = dict(context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=12)
CLIP_SIZES = {
    "ViT-B/32": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32,
                     **_TEXT),
    "RN50": dict(embed_dim=1024, image_resolution=224, vision_layers=(3, 4, 6, 3), vision_width=64,
                 vision_patch_size=None, **_TEXT),
}
_TINY_TEXT = dict(context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=2)
TINY_CLIP_SIZES = {  # the tokenizer fixes vocabulary and context; widths are multiples of the 64-wide heads
    "ViT-B/32": dict(embed_dim=64, image_resolution=224, vision_layers=2, vision_width=64, vision_patch_size=32,
                     **_TINY_TEXT),
    "RN50": dict(embed_dim=64, image_resolution=224, vision_layers=(1, 1, 1, 1), vision_width=8,
                 vision_patch_size=None, **_TINY_TEXT),
}
BACKBONE = {"liqe_mix": "ViT-B/32", "clipiqa+": "RN50"}  # pyiqa's default for each metric's class
LIQE_MIN_SIDE = 224  # LIQE.forward asserts it: it scores 224² patches
TEXT_CACHE = "liqe_text_feat_mix.pt"


def log(message: str) -> None:
    print(f"pyiqa_worker: {message}", file=sys.stderr, flush=True)


def _refuse_download(url, *args, **kwargs):
    url = getattr(url, "full_url", url)
    raise RuntimeError(f"pyiqa tried to download {url}: this worker never downloads (put the file in weights_dir)")


def pretrained_files(metric: str) -> list[str]:
    """The files `create_metric(metric)` reads, relative to torch's hub folder, by pyiqa's own URL tables."""
    from pyiqa.archs import clip_model, clipiqa_arch, liqe_arch

    own = {"liqe_mix": liqe_arch.default_model_urls["mix"], "clipiqa+": clipiqa_arch.default_model_urls["clipiqa+"]}
    return [f"clip/{os.path.basename(clip_model._MODELS[BACKBONE[metric]])}",
            f"pyiqa/{os.path.basename(urlparse(own[metric]).path)}"]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def build(cfg: dict) -> tuple[dict, dict]:
    """Every metric of `cfg`, and the provenance: versions, device, weights and the files read."""
    mode, metrics = cfg["weights"], cfg["metrics"]
    private = Path(tempfile.mkdtemp(prefix="pyiqa-worker-"))  # LIQE's text cache; the hub folder of random weights
    atexit.register(shutil.rmtree, private, ignore_errors=True)
    if mode == "pretrained":
        if cfg["weights_dir"]:
            torch.hub.set_dir(cfg["weights_dir"])
    else:
        torch.hub.set_dir(str(private))
    hub = Path(torch.hub.get_dir())  # read by pyiqa at import: set before it
    urllib.request.urlopen = _refuse_download  # OpenAI CLIP's downloader
    import pyiqa
    from pyiqa.archs import clipiqa_arch, liqe_arch
    from pyiqa.utils import download_util

    download_util.download_url_to_file = _refuse_download  # pyiqa's own files
    needed = [f for m in metrics for f in pretrained_files(m)] if mode == "pretrained" else []
    missing = [str(hub / f) for f in needed if not (hub / f).is_file()]
    if missing:
        raise FileNotFoundError(f"pyiqa weights missing for {', '.join(metrics)}: {', '.join(missing)} (weights_dir "
                                f"is torch's hub folder, pyiqa's files in pyiqa/ and OpenAI CLIP's in clip/; "
                                f"nothing is downloaded)")

    liqe_arch.load = clipiqa_arch.load = clip_loader(mode, hub)
    liqe_arch.DEFAULT_CACHE_DIR = str(private)
    shared_cache = hub / "pyiqa" / TEXT_CACHE
    if mode == "pretrained" and shared_cache.is_file():
        shutil.copyfile(shared_cache, private / TEXT_CACHE)

    device = cfg["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    models = {}
    for metric in metrics:
        torch.manual_seed(cfg["seed"])  # random weights: the same on every start
        options = {}
        if mode != "pretrained":  # liqe_mix's multitask prompts come with its weights: asked for without them
            options = {"pretrained": False, **({"mtl": True} if metric == "liqe_mix" else {})}
        models[metric] = pyiqa.create_metric(metric, device=torch.device(device), **options).eval()
    read = {f: hub / f for f in needed}
    if mode == "pretrained" and (private / TEXT_CACHE).is_file():
        read[f"pyiqa/{TEXT_CACHE}"] = private / TEXT_CACHE
        if not shared_cache.is_file():
            _publish(private / TEXT_CACHE, shared_cache)
    provenance = {"pyiqa": pyiqa.__version__, "torch": torch.__version__, "device": device, "weights": mode,
                  **({"weights_dir": str(hub)} if mode == "pretrained" else {"seed": cfg["seed"]}),
                  "files": {f: sha256(path) for f, path in read.items()}}
    return models, provenance


def clip_loader(mode: str, hub: Path):
    """What LIQE and CLIPIQA get in place of pyiqa's `clip_model.load(name, device)`, which downloads."""
    from pyiqa.archs import clip_model

    if mode == "pretrained":
        load = clip_model.load

        def from_file(name, device="cpu", **_):  # by path: `load` then skips its re-hash-or-download step
            return load(str(hub / "clip" / os.path.basename(clip_model._MODELS[name])), device)
        return from_file
    sizes = CLIP_SIZES if mode == "random" else TINY_CLIP_SIZES

    def at_random(name, device="cpu", **_):  # what `load` makes of a checkpoint, fp16 rounding included
        model = clip_model.build_model(clip_model.CLIP(**sizes[name]).state_dict()).to(device)
        return model.float() if str(device) == "cpu" else model
    return at_random


def _publish(built: Path, shared: Path) -> None:
    """LIQE's text features, once built, into the shared cache: written beside it, then renamed over it."""
    try:
        tmp = shared.with_name(f".{shared.name}.{os.getpid()}")
        shutil.copyfile(built, tmp)
        os.replace(tmp, shared)
    except OSError as e:
        log(f"LIQE text features not cached in {shared.parent} ({e}); every start computes them again")


def forward(model, images: list[np.ndarray], device: str) -> list:
    """One score per image of one size; on CUDA out of memory, halves; an image out of memory alone: "oom"."""
    try:
        x = torch.from_numpy(np.stack(images)).to(device).permute(0, 3, 1, 2).float().div(255)
        with torch.no_grad():
            return model(x).flatten().tolist()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        if len(images) == 1:
            return ["oom"]
        half = len(images) // 2
        return forward(model, images[:half], device) + forward(model, images[half:], device)


def score(models: dict, images: list[np.ndarray], batch_images: int, device: str) -> dict[str, list]:
    """Images of one size go through together, `batch_images` at a time."""
    sizes: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        sizes.setdefault(image.shape, []).append(i)
    scores = {}
    for metric, model in models.items():
        out: list = [None] * len(images)
        for shape, indices in sizes.items():
            if metric == "liqe_mix" and min(shape[:2]) < LIQE_MIN_SIDE:
                for i in indices:
                    out[i] = "too_small"
                continue
            for start in range(0, len(indices), batch_images):
                chunk = indices[start:start + batch_images]
                log(f"scoring {metric} on {len(chunk)} images of {shape[1]}x{shape[0]}")
                for i, value in zip(chunk, forward(model, [images[i] for i in chunk], device)):
                    out[i] = value
        scores[metric] = out
    return scores


def read_exact(stream, n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise EOFError("the scorer closed the pipe")
    return data


def serve() -> None:
    stdin = sys.stdin.buffer
    reply = os.fdopen(os.dup(1), "wb")  # the protocol's; library prints go to stderr from here on
    os.dup2(2, 1)
    line = stdin.readline()
    if not line:
        return
    cfg = json.loads(line)
    start = time.perf_counter()
    models, provenance = build(cfg)
    provenance["build_seconds"] = round(time.perf_counter() - start, 3)
    device = provenance["device"]
    reply.write(json.dumps({"ready": provenance}).encode() + b"\n")
    reply.flush()
    while line := stdin.readline():
        n = json.loads(line)["images"]
        images = []
        for _ in range(n):
            (size,) = struct.unpack("<Q", read_exact(stdin, 8))
            images.append(np.load(io.BytesIO(read_exact(stdin, size)), allow_pickle=False))
        try:
            answer = {"scores": score(models, images, cfg["batch_images"], device)}
        except Exception as e:  # a bug or a bad input: this request fails, the worker serves the next
            answer = {"error": f"{type(e).__name__}: {e}"}
        reply.write(json.dumps(answer).encode() + b"\n")
        reply.flush()


def save_torchscript(state: dict, path: Path) -> None:
    """`state` as a TorchScript archive, the format of OpenAI's CLIP files, which is all pyiqa's `load` reads
    of them (`torch.jit.load(…).state_dict()`); its fallback to a plain state dict does not rewind the file."""
    root = torch.nn.Module()
    for key, tensor in state.items():
        *path_to, name = key.split(".")
        module = root
        for part in path_to:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_buffer(name, tensor.detach().clone())
    torch.jit.save(torch.jit.script(root), str(path))


def write_tiny(folder: str, seed: int = 0) -> None:
    """The `tiny` models saved as pyiqa's pretrained files in torch's hub layout, so that tests load them through
    the `pretrained` path: a CLIP state dict per backbone, LIQE's {"params": state dict}, CLIP-IQA+'s prompts."""
    models, _ = build({"metrics": list(BACKBONE), "weights": "tiny", "weights_dir": None, "device": "cpu",
                       "seed": seed})
    liqe, clipiqa = models["liqe_mix"].net, models["clipiqa+"].net
    hub = Path(folder)
    (hub / "clip").mkdir(parents=True, exist_ok=True)
    (hub / "pyiqa").mkdir(exist_ok=True)
    clip_vit, own_liqe = pretrained_files("liqe_mix")
    clip_rn, own_clipiqa = pretrained_files("clipiqa+")
    save_torchscript(liqe.clip_model.state_dict(), hub / clip_vit)
    torch.save({"params": liqe.state_dict()}, hub / own_liqe)
    save_torchscript(clipiqa.clip_model[0].state_dict(), hub / clip_rn)
    torch.save(clipiqa.prompt_learner.ctx.data, hub / own_clipiqa)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write-tiny"]:
        write_tiny(sys.argv[2])
    else:
        serve()
