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

.PHONY: setup build-dataset train test test-fast bench browser pyiqa-env clean

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

# Headless Chromium for the report test (Debian's package; needs root, else that test is skipped).
browser:
	@command -v chromium >/dev/null || { apt-get update -q && apt-get install -y -q chromium fonts-wqy-microhei; } \
	  || echo "chromium could not be installed: the browser test will be skipped"

test: $(VENV)/.test $(PYIQA_VENV)/.ok browser
	$(PY) -m pytest -q

# For local work: everything but the tests marked slow (Ray clusters, several processes, the browser).
test-fast: $(VENV)/.test $(PYIQA_VENV)/.ok
	$(PY) -m pytest -q -m "not slow"

bench: $(VENV)/.test
	$(PY) -m bench.engine_overhead
	$(PY) -m bench.moe_dispatch
	$(PY) -m bench.train_step
	$(PY) -m bench.edit_overhead

clean:
	rm -rf runs models .pytest_cache
