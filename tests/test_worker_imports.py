"""Stage actors and Ray workers stay light: every Ray worker that runs a stage imports its module (and the
driver imports them all through the engine), so a model library imported at module level would cost each
worker process hundreds of MB (torch alone: ~460 MB RSS) whether or not a model worker runs there. Model
libraries are imported inside the worker that loads the model (bench/README.md, "Engine overhead")."""
from __future__ import annotations

import subprocess
import sys

MODULES = ["pipeline.engine", "pipeline.run", "stages.source", "stages.instruct", "stages.edit", "stages.score",
           "stages.pack"]
HEAVY = ["torch", "transformers", "diffusers", "open_clip", "vllm", "webdataset"]


def test_stage_modules_do_not_import_model_libraries():
    code = (f"import sys\nfor m in {MODULES!r}:\n    __import__(m)\n"
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"imported at module level: {out.stdout.strip()}"
