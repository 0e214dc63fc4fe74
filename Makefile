# The first two commands of the README:  make build-dataset  and  make test.
VENV    ?= .venv
PY      := $(VENV)/bin/python
RECIPE  ?= default-cpu
RUN_DIR ?= runs/default

export RAY_AUTH_MODE := disabled
export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup build-dataset test bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

# Builds the corpus into $(RUN_DIR); rerunning resumes (committed work is kept, leftovers discarded).
build-dataset: setup
	$(PY) -m pipeline run --recipe $(RECIPE) --run-dir $(RUN_DIR)

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m bench.engine_overhead

clean:
	rm -rf runs .pytest_cache
