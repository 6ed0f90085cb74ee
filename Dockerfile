# syntax=docker/dockerfile:1
# The GPU serving image: `python -m service serve` on onnxruntime-gpu, nothing else (no
# TensorFlow, no training or export code). docs/deployment.md says how to build and run it.
#
# onnxruntime-gpu 1.31 is built for CUDA 13.0 and cuDNN 9. This image takes both from NVIDIA's
# base image (CUDA 13 images ship cuDNN 9), not from the `[cuda,cudnn]` wheels (1.6 GB again).
# tests/deploy/test_image.py checks the CUDA major against the installed onnxruntime-gpu.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

# --- build: a virtual environment with the `serve` extra and the service package ------------
FROM ${CUDA_IMAGE} AS build
ARG DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Distribution packages follow the base image tag (pinning Ubuntu's point versions breaks the
# build whenever the archive moves on); Python packages are pinned by pyproject.toml.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Dependencies first, from pyproject.toml alone, so a code change does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['serve']))" > requirements.txt \
    && pip install --no-cache-dir -r requirements.txt
# Then the code: .dockerignore lets in only service/ and imaging/ (the image policy it shares
# with training), plus the two files the build reads.
COPY README.md ./
COPY imaging/ imaging/
COPY service/ service/
RUN pip install --no-cache-dir --no-deps . && rm -rf /src

# --- the serving image ----------------------------------------------------------------------
FROM ${CUDA_IMAGE}
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 cnn \
    && useradd --system --uid 10001 --gid cnn --no-create-home --shell /usr/sbin/nologin cnn
COPY --from=build /opt/venv /opt/venv
# CNN_SERVING_DEVICE=cuda: on the GPU or a one-line error and exit 2, never a quiet CPU
# fallback; `-e CNN_SERVING_DEVICE=auto` allows the CPU (logged and exported as a metric).
# HOME=/tmp: the user has no home, and CUDA's kernel cache wants a writable one.
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONSAFEPATH=1 \
    CNN_SERVING_DEVICE=cuda
USER 10001:10001
# 8000: HTTP (V2 REST, /v1 classify, the page, /docs); 8001: gRPC (both APIs, health,
# reflection); 8002: Prometheus /metrics.
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-m", "service", "health", "--server", "127.0.0.1:8001", "--timeout-s", "4"]
# `python -m service serve --repository /models` on CNN_SERVING_DEVICE (cuda): not `--device`
# here, which would win over the variable. Other subcommands: `docker run IMAGE health ...`.
ENTRYPOINT ["python", "-m", "service"]
CMD ["serve", "--repository", "/models"]
