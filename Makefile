# `make demo` and `make test` set up .venv on first use; later calls skip the install.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
EXTRAS := dev,ray,tensorboard
# `make test` adds the mlflow extra, so the MLflow tests run against a real `mlflow server` on
# 127.0.0.1 instead of skipping
TEST_EXTRAS := $(EXTRAS),mlflow
# Keep freed activation memory in the heap instead of returning it to the OS every step
# (glibc tunables; about 2x faster small CPU runs, same numbers; see BENCHMARKS.md). The values
# are MALLOC_ENV in ablations/constants.py (what the runner gives its workers), read from there;
# a value already in the environment wins.
MALLOC_ENV := $(shell python3 -c 'import runpy; env = runpy.run_path("ablations/constants.py")["MALLOC_ENV"]; print(*(f"{k}={v}" for k, v in env.items()))')
$(foreach pair,$(MALLOC_ENV),$(eval export $(subst =, ?= ,$(pair))))

.PHONY: demo test test-fast lint bench clean

$(PY):
	python3 -m venv $(VENV)

# torch==2.13.0 is the CPU wheel available offline here; plain `torch` would pull CUDA packages.
define install
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[$(1)]"
endef

$(STAMP): pyproject.toml | $(PY)
	$(call install,$(EXTRAS))
	touch $(STAMP)

# One pip call resolves mlflow with the rest (mlflow caps pyarrow); it covers what $(STAMP)
# installs, so it marks that done too.
$(TEST_STAMP): pyproject.toml | $(PY)
	$(call install,$(TEST_EXTRAS))
	touch $(TEST_STAMP) $(STAMP)

demo: $(STAMP)
	$(PY) run_ablations.py quickstart

test: $(TEST_STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup tests

# the tests under about a second each (no subprocess, kill, Ray, browser or real training run);
# one process: two xdist workers each import torch and collect, which costs more than it saves
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
