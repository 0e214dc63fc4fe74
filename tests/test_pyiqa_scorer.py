"""LIQE and CLIP-IQA+ through pyiqa in its own environment (filters/pyiqa_scorer.py, filters/pyiqa_worker.py).

With the environment (`make pyiqa-env`; `make test` builds it): pyiqa's real LIQE and CLIPIQA classes, offline,
with pyiqa's own CLIP class at random weights in place of the OpenAI download, scored out of process; then the
same models saved as pyiqa's pretrained files and loaded through the path real weights take. Without it those
tests skip. The adapter's failure handling runs everywhere, against stand-in workers (shell scripts).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data

from filters.pyiqa_scorer import PyiqaConfig, PyiqaError, PyiqaScorer
from filters.vlm_judges import EditPair, Scored
from manifests.rejected import Rejected

PYIQA_PYTHON = PyiqaScorer(PyiqaConfig()).python
WORKER = Path(__file__).resolve().parents[1] / "filters" / "pyiqa_worker.py"
needs_env = pytest.mark.skipif(not PYIQA_PYTHON.exists(),
                               reason=f"no pyiqa environment at {PYIQA_PYTHON}: `make pyiqa-env` builds it")


def _pair(top: int, left: int, size: tuple[int, int] = (224, 224)) -> EditPair:
    src = np.ascontiguousarray(skimage.data.astronaut()[top:top + size[0], left:left + size[1]])
    return EditPair(src, cv2.GaussianBlur(src, (9, 9), 3), "Blur the photo", None)


@pytest.fixture(scope="module")
def pairs() -> list[EditPair]:
    """Five 224² pairs and one 256x320 (a second size, stacked apart)."""
    return [_pair(40 * i, 50 * i) for i in range(5)] + [_pair(100, 80, (256, 320))]


@pytest.fixture(scope="module")
def tiny():
    scorer = PyiqaScorer(PyiqaConfig(weights="tiny", device="cpu", batch_size=4))
    yield scorer
    scorer.close()


@needs_env
def test_scores_ranges_and_deltas(tiny, pairs):
    results = tiny.score(pairs)
    assert len(results) == len(pairs) and all(isinstance(r, Scored) and not r.missing for r in results)
    for r in results:
        assert set(r.scores) == set(PyiqaScorer.names)
        for name, value in r.scores.items():
            low, high = PyiqaScorer.ranges[name]
            assert low <= value <= high, name
        assert r.scores["liqe_delta"] == r.scores["liqe_edited"] - r.scores["liqe_src"]
        assert r.scores["clipiqa_delta"] == r.scores["clipiqa_edited"] - r.scores["clipiqa_src"]
    assert len({r.scores["liqe_src"] for r in results}) == len(pairs)  # each image its own score
    provenance = tiny.provenance()
    assert provenance["pyiqa"] == "0.1.16" and provenance["weights"] == "tiny" and provenance["device"] == "cpu"
    assert provenance["metrics"] == ["liqe_mix", "clipiqa+"] and provenance["load_seconds"] > 0


@needs_env
def test_batch_matches_one_by_one(tiny, pairs):
    """Eight images per forward pass, or the two of one pair: the same scores to float rounding."""
    batched = tiny.score(pairs)
    alone = [tiny.score([p])[0] for p in pairs]
    for b, a in zip(batched, alone):
        assert b.scores == pytest.approx(a.scores, abs=1e-5)


@needs_env
def test_image_under_224_leaves_liqe_absent(tiny):
    [result] = tiny.score([_pair(0, 0, (200, 300))])
    assert set(result.scores) == {"clipiqa_src", "clipiqa_edited", "clipiqa_delta"}
    assert set(result.missing) == {"liqe_src", "liqe_edited", "liqe_delta"}
    assert all(isinstance(why, Rejected) and why.reason == "too_small" for why in result.missing.values())


@needs_env
def test_killed_worker_fails_its_call_and_the_next_starts_afresh(tiny, pairs):
    before = tiny.score(pairs[:2])
    os.kill(tiny._proc.pid, signal.SIGKILL)
    with pytest.raises(PyiqaError, match=r"pyiqa worker \(liqe_mix, clipiqa\+\) died .*killed by SIGKILL"):
        tiny.score(pairs[:2])
    assert [r.scores for r in tiny.score(pairs[:2])] == [r.scores for r in before]  # seeded: the same weights


@needs_env
def test_pretrained_path_loads_pyiqa_files(tmp_path, tiny, pairs):
    """The tiny models written as pyiqa's files (torch's hub layout) and read back through `weights: pretrained`:
    the same scores, every file hashed, and LIQE's text features published into the weights folder."""
    subprocess.run([str(PYIQA_PYTHON), "-I", str(WORKER), "--write-tiny", str(tmp_path)], check=True,
                   capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    scorer = PyiqaScorer(PyiqaConfig(weights="pretrained", weights_dir=str(tmp_path), device="cpu"))
    try:
        loaded = scorer.score(pairs[:3])
    finally:
        scorer.close()
    for got, want in zip(loaded, tiny.score(pairs[:3])):
        assert got.scores == pytest.approx(want.scores, abs=1e-6)
    files = scorer.provenance()["files"]
    assert set(files) == {"clip/ViT-B-32.pt", "clip/RN50.pt", "pyiqa/liqe_mix.pt",
                          "pyiqa/CLIP-IQA%2B_learned_prompts-603f3273.pth", "pyiqa/liqe_text_feat_mix.pt"}
    assert all(len(digest) == 64 for digest in files.values())
    assert (tmp_path / "pyiqa" / "liqe_text_feat_mix.pt").is_file()


@needs_env
def test_missing_weights_are_named_and_never_downloaded(tmp_path, pairs):
    scorer = PyiqaScorer(PyiqaConfig(weights_dir=str(tmp_path), device="cpu"))
    with pytest.raises(PyiqaError, match="could not start") as first:
        scorer.score(pairs[:1])
    for name in ("clip/ViT-B-32.pt", "pyiqa/liqe_mix.pt", "clip/RN50.pt", "CLIP-IQA%2B_learned_prompts-603f3273.pth"):
        assert name in str(first.value)
    with pytest.raises(PyiqaError) as again:  # at once: a missing file is not looked for once per pair
        scorer.score(pairs[:1])
    assert again.value is first.value and scorer._proc.poll() is not None
    assert list(tmp_path.iterdir()) == []


# The adapter's failures, against Python scripts standing in for the worker (as `python:`, they ignore their
# arguments): they speak the protocol and then fail in one way each.
STAND_IN = """#!{python}
import json, os, struct, sys, time
open({starts!r}, "a").write("started\\n")
stdin = sys.stdin.buffer
def request():
    line = stdin.readline()
    if not line:
        sys.exit(0)
    for _ in range(json.loads(line)["images"]):
        (size,) = struct.unpack("<Q", stdin.read(8))
        stdin.read(size)
def answer(message):
    sys.stdout.write(json.dumps(message) + "\\n")
    sys.stdout.flush()
def log(line):
    print(line, file=sys.stderr, flush=True)
"""
READY = 'stdin.readline(); answer({"ready": {"device": "cpu"}})\n'


def _stand_in(tmp_path: Path, body: str, **cfg) -> PyiqaScorer:
    script = tmp_path / "python"
    script.write_text(STAND_IN.format(python=sys.executable, starts=str(tmp_path / "starts")) + body)
    script.chmod(0o755)
    return PyiqaScorer(PyiqaConfig(python=str(script), **cfg))


def _starts(tmp_path: Path) -> int:
    return len((tmp_path / "starts").read_text().splitlines())


def test_death_names_the_metric_and_stderr(tmp_path, pairs):
    scorer = _stand_in(tmp_path, READY + """request()
log("pyiqa_worker: scoring clipiqa+ on 2 images of 224x224")
log("Fatal Python error: Segmentation fault")
os.kill(os.getpid(), 9)
""")
    with pytest.raises(PyiqaError) as error:
        scorer.score(pairs[:1])
    message = str(error.value)
    assert "died while scoring clipiqa+: it was killed by SIGKILL" in message
    assert message.endswith("Segmentation fault")
    with pytest.raises(PyiqaError, match="died while scoring clipiqa"):  # the next call starts a fresh worker
        scorer.score(pairs[:1])
    assert _starts(tmp_path) == 2


def test_three_deaths_in_a_row_stop_the_restarts(tmp_path, pairs):
    scorer = _stand_in(tmp_path, READY + "request()\nsys.exit(3)\n")
    for _ in range(3):
        with pytest.raises(PyiqaError, match="before answering: it exited with code 3"):
            scorer.score(pairs[:1])
    with pytest.raises(PyiqaError, match="3 pyiqa workers died in a row"):
        scorer.score(pairs[:1])
    assert _starts(tmp_path) == 3


def test_failed_start_is_not_retried(tmp_path, pairs):
    scorer = _stand_in(tmp_path, 'log("FileNotFoundError: pyiqa weights missing: /w/clip/RN50.pt")\nsys.exit(1)\n')
    for _ in range(2):
        with pytest.raises(PyiqaError, match="(?s)could not start: it exited with code 1.*/w/clip/RN50.pt"):
            scorer.score(pairs[:1])
    assert _starts(tmp_path) == 1


def test_hung_worker_is_killed_after_timeout(tmp_path, pairs):
    scorer = _stand_in(tmp_path, READY + "request()\ntime.sleep(60)\n", timeout_s=1)
    started = time.monotonic()
    with pytest.raises(PyiqaError, match="gave no answer within 1 s"):
        scorer.score(pairs[:1])
    assert time.monotonic() - started < 10


def test_request_error_keeps_the_worker(tmp_path, pairs):
    scorer = _stand_in(tmp_path, READY + 'while True:\n    request()\n    answer({"error": "ValueError: bad image"})\n')
    for _ in range(2):
        with pytest.raises(PyiqaError, match="failed the request: ValueError: bad image"):
            scorer.score(pairs[:1])
    assert _starts(tmp_path) == 1


def test_no_environment_says_how_to_build_it(tmp_path, pairs):
    scorer = PyiqaScorer(PyiqaConfig(python=str(tmp_path / "absent" / "python")))
    with pytest.raises(PyiqaError, match="make pyiqa-env"):
        scorer.score(pairs[:1])
    assert scorer.provenance()["load_seconds"] is None


def test_config_is_checked():
    with pytest.raises(ValueError):
        PyiqaConfig(metrics=[])
    with pytest.raises(ValueError):
        PyiqaConfig(metrics=["liqe_mix", "liqe_mix"])
    with pytest.raises(ValueError):
        PyiqaConfig(metrics=["musiq"])
    with pytest.raises(ValueError):
        PyiqaConfig(device="tpu")
    assert PyiqaConfig(metrics=["clipiqa+"], device="cuda:1").metrics == ("clipiqa+",)
