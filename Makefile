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

.PHONY: setup build-dataset train test test-fast bench browser clean

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

# Builds the corpus into $(RUN_DIR); rerunning resumes (committed work is kept, leftovers discarded).
# The default recipe needs the base install only; any other recipe may run model workers.
build-dataset: $(if $(filter default-cpu,$(RECIPE)),$(VENV)/.base,$(VENV)/.models)
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

test: $(VENV)/.test browser
	$(PY) -m pytest -q

# For local work: everything but the tests marked slow (Ray clusters, several processes, the browser).
test-fast: $(VENV)/.test
	$(PY) -m pytest -q -m "not slow"

bench: $(VENV)/.test
	$(PY) -m bench.engine_overhead
	$(PY) -m bench.moe_dispatch
	$(PY) -m bench.train_step
	$(PY) -m bench.edit_overhead

clean:
	rm -rf runs models .pytest_cache
