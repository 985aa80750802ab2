# worker-transformers: one image, three ways for the model to reach the GPU, chosen with MODEL_SOURCE:
#   cached (default)  no weights in the image: RunPod's cached models (the endpoint's Model field), else the Hub
#   baked             the weights in the image at /models, with manifest.json; the worker runs offline
#   volume            the weights on a network volume at /runpod-volume/models/ORG/NAME, filled from the Hub once
# Needs BuildKit (the default builder since Docker 23). builder/build.sh runs one command per mode; with no build
# argument at all (as RunPod's GitHub integration builds) the result is the cached image of the default model.
# Layers run from the most stable to the most changed: a code change rebuilds only the last few.

# RunPod's own PyTorch image, pinned: RunPod hosts keep their popular base images cached, so a worker's first
# pull fetches only this project's layers. CUDA 12.8.1 (Hopper and Blackwell included; the host's driver must
# support CUDA 12.8), torch 2.8.0 and torchvision 0.23.0, Python 3.12, Ubuntu 22.04.
ARG BASE_IMAGE=runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2204
ARG MODEL_SOURCE=cached
ARG MODEL_NAME=HuggingFaceTB/SmolLM2-135M-Instruct
ARG MODEL_REVISION=

FROM ${BASE_IMAGE} AS runtime
# No system packages: the worker needs Python, torch and (for image processors) torchvision, and the base has them.
# pip byte-compiles what it installs, so imports at cold start read .pyc files. The base's PIP_CACHE_DIR points
# into /workspace; pointing it at the cache mount keeps downloaded wheels out of the image and across builds.
COPY builder/requirements.txt /opt/worker/requirements.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    PIP_CACHE_DIR=/root/.cache/pip python -m pip install --disable-pip-version-check -r /opt/worker/requirements.txt

# cached: nothing to add. MODEL_SOURCE stays `auto`: RunPod's cached model first, then the Hub as a last resort.
FROM runtime AS model-cached

# volume: the worker looks only on the network volume and fills it from the Hub when the model is missing.
FROM runtime AS model-volume
ENV MODEL_SOURCE=volume

# baked: the fetch script alone comes before the weights, so changing any other file reuses the weights' layer.
# The Hugging Face token is a BuildKit secret (a file under /run/secrets during this RUN only): never an ARG or
# ENV, which would keep it in the image's history. When builder/model-files holds a model (builder/build.sh
# baked --from-folder DIR puts it there), it is baked instead of downloading MODEL_NAME from the Hub.
FROM runtime AS model-baked
ARG MODEL_NAME
ARG MODEL_REVISION
COPY builder/fetch_model.py /opt/builder/fetch_model.py
COPY src/worker_transformers/__init__.py /opt/src/worker_transformers/
COPY src/worker_transformers/model/__init__.py src/worker_transformers/model/manifest.py /opt/src/worker_transformers/model/
RUN --mount=type=secret,id=HF_TOKEN,required=false \
    --mount=type=bind,source=builder/model-files,target=/model-files \
    if [ -f /model-files/config.json ]; then source=/model-files; else source="$MODEL_NAME"; fi \
    && python /opt/builder/fetch_model.py "$source" --model-id "$MODEL_NAME" --revision "$MODEL_REVISION" --out /models
ENV MODEL_SOURCE=baked \
    HF_HUB_OFFLINE=1

FROM model-${MODEL_SOURCE}
ARG MODEL_NAME
ARG MODEL_REVISION
ENV MODEL_NAME=${MODEL_NAME} \
    MODEL_REVISION=${MODEL_REVISION}
WORKDIR /app
# test_input.json is the job `python handler.py` runs when started outside RunPod (local mode).
COPY handler.py test_input.json ./
# Chat templates to choose with CHAT_TEMPLATE (a path relative to /app), as .runpod/tests.json does.
COPY builder/chat_templates ./builder/chat_templates
COPY src ./src
# Bytecode first, then the readahead manifest: the pages of the files startup imports (the .pyc among them)
# that the worker asks the kernel for at start, so a cold disk serves them ahead of the imports (startup/readahead.py).
RUN python -m compileall -q handler.py src \
 && PYTHONPATH=src python -m worker_transformers.startup.record_readahead
# Exec form: python is PID 1 and receives the platform's SIGTERM itself (a shell would swallow it).
CMD ["python", "-u", "handler.py"]
