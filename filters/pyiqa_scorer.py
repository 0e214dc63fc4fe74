"""LIQE and CLIP-IQA+ through pyiqa (reference-code.md §0: `pyiqa.create_metric("liqe_mix")`, about 1–5, and
`"clipiqa+"`, 0–1), scored in a pyiqa environment of their own: the source's, the edit's and their difference,
which the reference gates on (§1.3: LIQE(inpainted) ≥ 3.5, LIQE drop ≤ 0.2, CLIP-IQA+ drop ≤ 0.028).

    iqa:
      backend: pyiqa
      metrics: [liqe_mix, clipiqa+]
      python: .venv/pyiqa/bin/python   # `make pyiqa-env`; relative: to the repository; on a cluster, the image's
      weights_dir: /models/torch-hub   # torch's hub folder: pyiqa/liqe_mix.pt, clip/ViT-B-32.pt, … (never downloads)
      device: auto
      batch_size: 8

Why apart: pyiqa 0.1.16 pulls opencv-python, whose cv2/ would overwrite opencv-contrib's, plus ~630 MB more
(reference/environment.md). `make pyiqa-env` builds a venv that holds pyiqa and the few pure-Python packages its
LIQE/CLIP-IQA+ path imports, and sees the project venv's packages (torch, numpy, our cv2) through a .pth file, so
the project's environment never gets pyiqa and the extra one costs megabytes.

Why a subprocess and not a Ray actor with `runtime_env={"py_executable": …}` (which Ray 2.60 has): the worker
(filters/pyiqa_worker.py) is a child of the score stage's actor, so it runs on the node and the GPU Ray already
gave that actor (CUDA_VISIBLE_DEVICES and the CPU limits are inherited), needs no second resource request that
could wait forever behind the stage's own pool, ships images over a pipe instead of the object store, dies with
the actor (end of its stdin), and works the same outside Ray (tests, the CLI). A py_executable actor would run
Ray's own worker under the pyiqa interpreter and be scheduled on its own. What a cluster needs either way: the
pyiqa environment at `python:` on every node, as it needs the project's.

A call is one request; images travel as .npy frames, and images of one size are stacked into forward passes of
up to `batch_size` pairs (twice as many images); scores match one-by-one scoring (the reference's batch 1) to
float rounding.
Failures: a worker that cannot start (no environment, missing weights) fails every later call with the same
error without starting again; a worker that dies or hangs past `timeout_s` fails its call with the metric it was
running and its stderr tail, and the next call starts a fresh one (three deaths in a row stop that). An image out
of CUDA memory alone ends its pair as `ItemFailed("oom")`; one under LIQE's 224 px leaves the LIQE scores absent
(`too_small`), so the policy decides only if a rule needs them.
"""
from __future__ import annotations

import collections
import io
import json
import os
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator

from filters.vlm_judges import EditPair, Scored
from manifests.config import Strict
from manifests.rejected import ItemFailed, Rejected

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("pyiqa_worker.py")
PREFIX = {"liqe_mix": "liqe", "clipiqa+": "clipiqa"}  # metric → its scores' prefix
SCORING = "pyiqa_worker: scoring "  # the worker's line before each forward pass: "… METRIC on N images of WxH"
MAX_DEATHS = 3  # deaths in a row, without an answer between, before the scorer stops starting workers


class PyiqaConfig(Strict):
    backend: Literal["pyiqa"] = "pyiqa"
    metrics: tuple[Literal["liqe_mix", "clipiqa+"], ...] = ("liqe_mix", "clipiqa+")
    python: str = ".venv/pyiqa/bin/python"  # the pyiqa environment's interpreter; relative: to the repository
    # pretrained: pyiqa's files from weights_dir; random: the same models at random weights (benchmarks);
    # tiny: shrunk random CLIP backbones (tests). See filters/pyiqa_worker.py.
    weights: Literal["pretrained", "random", "tiny"] = "pretrained"
    weights_dir: str | None = None  # torch's hub folder (pyiqa/, clip/); None: $TORCH_HOME/hub or ~/.cache/torch/hub
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    batch_size: int = Field(8, ge=1)  # pairs per forward pass, which sees twice as many images
    seed: int = 0  # random and tiny weights
    timeout_s: float = Field(900, gt=0)  # the start (LIQE encodes its prompts once) and each call

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v or len(set(v)) != len(v):
            raise ValueError("metrics: one or more of liqe_mix, clipiqa+, each once")
        return v


class PyiqaError(RuntimeError):
    """The pyiqa worker could not answer: it did not start, died, hung, or failed the request."""


class PyiqaScorer:
    backend = "pyiqa"
    Config = PyiqaConfig
    names = ("liqe_src", "liqe_edited", "liqe_delta", "clipiqa_src", "clipiqa_edited", "clipiqa_delta")
    ranges: ClassVar[dict[str, tuple[float, float]]] = {
        "liqe_src": (1.0, 5.0), "liqe_edited": (1.0, 5.0), "liqe_delta": (-4.0, 4.0),  # Σ k·p(k), k = 1…5
        "clipiqa_src": (0.0, 1.0), "clipiqa_edited": (0.0, 1.0), "clipiqa_delta": (-1.0, 1.0),  # a probability
    }

    def __init__(self, cfg: PyiqaConfig) -> None:
        """Starts nothing: the worker starts on the first score."""
        self.cfg = cfg
        self._proc: subprocess.Popen | None = None
        self._stderr: collections.deque[tuple[int, str]] = collections.deque(maxlen=40)  # (line number, line)
        self._lines = 0  # stderr lines so far
        self._drainer: threading.Thread | None = None
        self._ready: dict | None = None  # the worker's provenance
        self._load_seconds: float | None = None
        self._start_error: PyiqaError | None = None
        self._deaths = 0
        self._lock = threading.Lock()

    @property
    def python(self) -> Path:
        return ROOT / self.cfg.python  # an absolute python: stays as it is

    def score(self, pairs: Sequence[EditPair]) -> list[Scored | ItemFailed]:
        if not pairs:
            return []
        images = [image for p in pairs for image in (p.source, p.edited)]
        with self._lock:
            values = self._request(images)
        return [self._scored(values, 2 * i) for i in range(len(pairs))]

    def _scored(self, values: dict[str, list], i: int) -> Scored | ItemFailed:
        scores: dict[str, float] = {}
        missing: dict[str, Rejected] = {}
        for metric, per_image in values.items():
            p, src, edited = PREFIX[metric], per_image[i], per_image[i + 1]
            if "oom" in (src, edited):
                return ItemFailed("oom", f"pyiqa {metric}: CUDA out of memory on one image alone")
            for side, value in (("src", src), ("edited", edited)):
                if value == "too_small":
                    missing[f"{p}_{side}"] = Rejected("too_small", f"{metric} scores 224x224 patches: the {side} "
                                                                   f"image's short side is under 224 px")
                else:
                    scores[f"{p}_{side}"] = float(value)
            if f"{p}_src" in scores and f"{p}_edited" in scores:
                scores[f"{p}_delta"] = scores[f"{p}_edited"] - scores[f"{p}_src"]
            else:
                missing[f"{p}_delta"] = missing.get(f"{p}_src") or missing[f"{p}_edited"]
        return Scored(scores, missing)

    def _request(self, images: list[np.ndarray]) -> dict[str, list]:
        self._start()
        frames = [json.dumps({"images": len(images)}).encode() + b"\n"]
        for image in images:
            buffer = io.BytesIO()
            np.save(buffer, np.ascontiguousarray(image, dtype=np.uint8), allow_pickle=False)
            frames += [struct.pack("<Q", buffer.getbuffer().nbytes), buffer.getvalue()]
        mark = self._lines
        try:
            answer = self._answer(b"".join(frames))
        except PyiqaError as e:
            self._deaths += 1
            running = [line.split()[2] for n, line in self._stderr if n > mark and line.startswith(SCORING)]
            error = PyiqaError(f"pyiqa worker ({', '.join(self.cfg.metrics)}) died "
                               f"{f'while scoring {running[-1]}' if running else 'before answering'}: {e}")
            if self._deaths >= MAX_DEATHS:  # a broken GPU or driver: stop paying a start per pair
                self._start_error = PyiqaError(f"{MAX_DEATHS} pyiqa workers died in a row; the last: {error}")
            raise error from None
        self._deaths = 0
        if "error" in answer:
            raise PyiqaError(f"pyiqa worker failed the request: {answer['error']}")
        return answer["scores"]

    def _start(self) -> None:
        if self._start_error is not None:
            raise self._start_error
        if self._proc is not None and self._proc.poll() is None:
            return
        if not os.access(self.python, os.X_OK):
            self._start_error = PyiqaError(f"no pyiqa environment at {self.python}: build it with `make pyiqa-env`, "
                                           f"or set python: to its interpreter")
            raise self._start_error
        cfg = self.cfg
        start = time.perf_counter()
        self._proc = subprocess.Popen([str(self.python), "-I", str(WORKER)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      env={**os.environ, "HF_HUB_OFFLINE": "1"})
        self._drainer = threading.Thread(target=self._drain, args=(self._proc.stderr,), daemon=True)
        self._drainer.start()
        settings = {"metrics": list(cfg.metrics), "weights": cfg.weights, "weights_dir": cfg.weights_dir,
                    "device": cfg.device, "batch_images": 2 * cfg.batch_size, "seed": cfg.seed}
        try:
            self._ready = self._answer(json.dumps(settings).encode() + b"\n")["ready"]
        except PyiqaError as e:  # missing weights or environment: every later call would fail the same way
            self._start_error = PyiqaError(f"pyiqa worker ({', '.join(cfg.metrics)}) could not start: {e}")
            raise self._start_error from None
        self._load_seconds = time.perf_counter() - start

    def _answer(self, message: bytes) -> dict:
        """`message` to the worker, and its one-line answer; when none comes, the error that says why, with the
        worker's stderr tail."""
        proc, fired = self._proc, threading.Event()
        watchdog = threading.Timer(self.cfg.timeout_s, lambda: (fired.set(), proc.kill()))
        watchdog.start()
        try:
            proc.stdin.write(message)
            proc.stdin.flush()
            line = proc.stdout.readline()
        except (BrokenPipeError, ValueError):
            line = b""  # it died: said below
        finally:
            watchdog.cancel()
        if line:
            return json.loads(line)
        try:  # it closed its stdout: exiting, or hung
            code = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        self._drainer.join(timeout=5)  # stderr ends with the process: its last lines are in
        how = (f"gave no answer within {self.cfg.timeout_s:g} s" if fired.is_set()
               else f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}")
        tail = "\n".join(line for _, line in list(self._stderr)[-15:])
        raise PyiqaError(f"it {how}; its stderr ends:\n{tail}")

    def _drain(self, stream) -> None:
        for raw in stream:
            self._lines += 1
            self._stderr.append((self._lines, raw.decode(errors="replace").rstrip()))

    def provenance(self) -> dict:
        cfg = self.cfg
        return {"scorer": self.backend, "metrics": list(cfg.metrics), "python": str(self.python),
                **(self._ready or {"weights": cfg.weights, "device": cfg.device}), "load_seconds": self._load_seconds}

    def close(self) -> None:
        """Ends the worker (it exits at the end of its stdin); it would end with this process anyway."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.stdin.close()
            proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # at interpreter exit; the worker ends with its stdin anyway
            pass
