# Two commands on a fresh machine:  make demo  |  make test
# torch 2.13.0 is installed first: it is a local CPU wheel here, and any later
# requirement on torch is then already met (otherwise pip pulls CUDA builds, several GB).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-fast lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install torch==2.13.0
	DS_BUILD_OPS=0 $(VENV)/bin/pip install -e ".[test]"
	# DeepSpeed's CPU Adam (ZeRO-Offload, train.deepspeed) is a C++ op built on first use:
	# built here once (about a minute), into torch's extension cache.
	$(PY) -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m pipeline demo-assets runs/tiny-assets
	$(PY) -m pipeline run configs/tiny.yaml

# The full suite (what CI runs): lint, then every test, Ray and subprocess runs included.
test: install lint
	$(PY) -m pytest -q tests

# The fast tier: tests that start neither Ray nor a subprocess (about a minute on 2 cores).
test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

clean:
	rm -rf runs
