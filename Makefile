# Two entry points do all the set-up on a fresh machine: `make demo` and `make test`.
#
# Both install into $(VENV) from requirements.lock (exact versions with hashes, the ones CI
# tests), plus torch 2.13.0 (on this project's CPU machines pip takes the CPU build that lies
# on their disk; the lock leaves torch and its CUDA packages out, so nothing else decides
# which torch build comes). `make lock` regenerates the lock; `make test-latest` runs the
# whole suite against the newest versions pyproject.toml allows, in a venv of its own.
#
# The repository root is never put on sys.path (its folders would shadow third-party
# packages of the same names): commands run the installed console scripts, and `python -P`
# (PYTHONSAFEPATH) where a module must run with -m.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
TORCH ?= torch==2.13.0
LOCK := requirements.lock
UV_VERSION := 0.13.8
LATEST_VENV ?= .venv-latest
export PYTHONSAFEPATH := 1

.PHONY: install demo test lint typecheck unit proto serve clean lock test-latest

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-deps --require-hashes -r $(LOCK)
	$(PY) -m pip install -q --no-deps $(TORCH)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/pdserve demo

serve: install
	$(VENV)/bin/pdserve serve

lint: install
	$(VENV)/bin/ruff check .

# mypy cannot follow setuptools' editable import hook, so it reads the packages through a
# link named `pdserve` to the repository root, as the installed package names them.
typecheck: install
	mkdir -p $(VENV)/typecheck && ln -sfn $(CURDIR) $(VENV)/typecheck/pdserve
	MYPYPATH=$(VENV)/typecheck $(VENV)/bin/mypy -p pdserve

test: install lint typecheck
	# The pinned protoc that generated proto/*_pb2*.py, so a test can check they are current.
	$(PY) -m pdserve.proto.gen --install-tools
	$(VENV)/bin/pytest -q -ra

proto: install
	$(PY) -m pdserve.proto.gen

# Exact versions with hashes for this machine's Python and platform; torch and the CUDA
# packages PyPI's torch pulls in are left out (the install takes torch from $(TORCH)).
lock:
	[ -x build/uv/bin/uv ] || { $(PYTHON) -m venv build/uv && build/uv/bin/pip install -q uv==$(UV_VERSION); }
	mkdir -p build && echo "$(TORCH)" > build/lock-constraints.txt
	echo "setuptools>=77" > build/lock-build.in
	build/uv/bin/uv pip compile -q pyproject.toml build/lock-build.in --extra dev \
	    --generate-hashes --python-version 3.11 -c build/lock-constraints.txt \
	    --no-emit-package torch --no-header --annotation-style line -o build/lock.txt
	awk '/^[a-z]/{skip=0} /^(nvidia-|cuda-)/{skip=1} !skip' build/lock.txt > build/lock.body
	{ echo "# Exact versions with hashes that \`make install\` takes (\`make lock\` regenerates it)."; \
	  echo "# torch comes from \$$(TORCH) in the Makefile; its CUDA packages are left out."; \
	  cat build/lock.body; } > $(LOCK)
	! grep -qE '^(torch|nvidia-|cuda-)' $(LOCK)

# The newest versions pyproject.toml allows (torch stays at $(TORCH): the newest torch PyPI
# serves is a CUDA build of several GB), in $(LATEST_VENV), then the same checks as `test`.
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install -q $(TORCH)
	mkdir -p build && echo "$(TORCH)" > build/latest-constraints.txt
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager \
	    -c build/latest-constraints.txt -e ".[dev]"
	$(LATEST_VENV)/bin/python -m pip check
	$(LATEST_VENV)/bin/python -m pip list --format freeze > build/latest-versions.txt
	touch $(LATEST_VENV)/.installed-stamp
	$(MAKE) VENV=$(LATEST_VENV) STAMP=$(LATEST_VENV)/.installed-stamp lint typecheck
	$(LATEST_VENV)/bin/python -m pdserve.proto.gen --install-tools
	$(LATEST_VENV)/bin/pytest -q -ra
	@echo "newest versions tested (build/latest-versions.txt):"
	@grep -iE '^(ray|torch|triton|transformers|tokenizers|kernels|grpcio|protobuf|prometheus-client|gguf|safetensors|msgpack|pyyaml|numpy)==' build/latest-versions.txt

clean:
	rm -rf $(VENV) $(LATEST_VENV) .mypy_cache .ruff_cache .pytest_cache
