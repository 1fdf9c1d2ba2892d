# Two commands matter: `make demo` and `make test`. Both build .venv from the
# pinned requirements.lock first, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: all venv demo test test-unit proto proto-check lint bench chaos clean

all: test

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Regenerates the checked-in wire code; tests/unit/test_proto_drift.py fails when it is stale.
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto \
	  --python_out=runtime --grpc_python_out=runtime --pyi_out=runtime \
	  proto/intertie/v1/*.proto

demo: $(STAMP)
	$(PY) examples/quickstart.py
	$(PY) examples/federated_map.py
	$(PY) examples/datasets.py

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check runtime gateways tests examples bench
	$(VENV)/bin/mypy runtime/intertie gateways/intertie_gateway

bench: $(STAMP)
	$(PY) bench/overhead.py
	$(PY) bench/placement.py
	$(PY) bench/federation.py
	$(PY) bench/datasets.py

# Fault injection and fuzzing at scale (minutes): prints what was lost, delivered twice or
# run twice per experiment, and per RPC how many inputs crashed, hung or got an untyped answer.
chaos: $(STAMP)
	$(PY) bench/chaos.py
	$(PY) bench/fuzz.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
