"""One OpenCV in the project's environment. The opencv-python, -headless, -contrib and -contrib-headless wheels all
install the same cv2/ folder, so a second one overwrites the first: the contrib modules (cv2.xphoto, …) vanish,
or a mix of two builds remains. Two of our dependencies require opencv-python: rapidocr-onnxruntime (installed
without its dependencies, Makefile) and pyiqa (kept in an environment of its own, `make pyiqa-env`)."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import subprocess
import sys

import pytest

from filters.pyiqa_scorer import PyiqaConfig, PyiqaScorer

# Every distribution that owns a file under cv2/, whatever its name, for the interpreter that runs it.
CV2_OWNERS = """
import importlib.metadata, json
owners = sorted({d.metadata["Name"] for d in importlib.metadata.distributions()
                 if any(f.parts[0] == "cv2" for f in d.files or ())})
print(json.dumps(owners))
"""


def test_one_distribution_provides_cv2():
    owners = subprocess.run([sys.executable, "-c", CV2_OWNERS], check=True, capture_output=True, text=True).stdout
    assert json.loads(owners) == ["opencv-contrib-python-headless"]
    import cv2

    assert hasattr(cv2, "xphoto")  # contrib's
    assert importlib.metadata.distribution("rapidocr-onnxruntime")  # there, and it did not bring opencv-python


def test_pyiqa_is_not_in_the_project_environment():
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution("pyiqa")
    assert importlib.util.find_spec("pyiqa") is None


def test_pyiqa_environment_uses_our_cv2():
    """The pyiqa environment brings no OpenCV of its own: `import cv2` there is the project's contrib build."""
    python = PyiqaScorer(PyiqaConfig()).python
    if not python.exists():
        pytest.skip(f"no pyiqa environment at {python}: `make pyiqa-env` builds it")
    script = CV2_OWNERS + ("import cv2; print(json.dumps([cv2.__file__, hasattr(cv2, 'xphoto'), "
                           "importlib.metadata.version('pyiqa')]))")
    lines = subprocess.run([str(python), "-I", "-c", script], check=True, capture_output=True, text=True).stdout
    owners, (cv2_file, contrib, version) = map(json.loads, lines.splitlines()[-2:])
    assert owners == ["opencv-contrib-python-headless"] and contrib and version == "0.1.16"
    import cv2

    assert cv2_file == cv2.__file__
