# Two entry points do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test lint typecheck unit proto serve clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first (pinned for tests), so the package's torch>=2.6 is met.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m cluster.cli demo

serve: install
	$(PY) -m cluster.cli serve

lint: install
	$(PY) -m ruff check .

typecheck: install
	$(PY) -m mypy engine kernels prefill_worker decode_worker router cluster proto

test: install lint typecheck
	# The pinned protoc that generated proto/*_pb2*.py, so a test can check they are current.
	$(PY) -m proto.gen --install-tools
	$(PY) -m pytest -q -ra

proto: install
	$(PY) -m proto.gen

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
