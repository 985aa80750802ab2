# Quick start: `make demo` (run the default model), `make test` (run the tests).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMPS := .stamps

.PHONY: demo test model openai-server bench bench-serve bench-coldstart bench-gpu docker-check clean

$(STAMPS)/venv: pyproject.toml
	@mkdir -p $(STAMPS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: later installs then keep this build instead of pulling another
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $@

model: $(STAMPS)/venv
	$(PY) builder/default_model.py

demo: model
	$(PY) handler.py --test_input "$$(cat test_input.json)"

test: model
	$(PY) -m pytest

# The OpenAI-compatible API on localhost:8000 (/openai/v1 and /v1), through the real handler. PORT=... for another.
PORT ?= 8000
openai-server: model
	$(PY) -m worker_transformers.serving.openai.server --port $(PORT)

# Benchmarks print a table and write JSON + PNG under bench/out/.
bench: bench-coldstart bench-serve

bench-serve: model
	$(PY) bench/serve.py --json bench/out/serve.json

# The GPU-only checks (a CUDA device; a few minutes): serving, greedy batched == serial, host syncs per step,
# out-of-memory recovery, 8 GB placement. See bench/gpu.py.
bench-gpu: model
	$(PY) bench/gpu.py --json bench/out/gpu.json

# The image in its three modes, built and run with a private Docker engine (root; see tests/docker/check_image.sh).
docker-check: model
	bash tests/docker/check_image.sh

# Cold start against its baselines (a few minutes; see README). RUNS=5 for more runs per case.
RUNS ?= 3
bench-coldstart: model
	$(PY) bench/coldstart.py --runs $(RUNS) --json bench/out/coldstart.json --png bench/out/coldstart.png

clean:
	rm -rf $(VENV) $(STAMPS)
