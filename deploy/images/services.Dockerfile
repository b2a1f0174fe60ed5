# syntax=docker/dockerfile:1.7
#
# adrec services image: `adrec serve recall|ranking|gateway|events|admin`.
#
# No Java and no Spark: the package is installed without its `job` extra, so pyspark,
# pandas, pyarrow and scikit-learn are never pulled. Build from the repository root
# (BuildKit):
#
#   docker build -f deploy/images/services.Dockerfile -t adrec-services:0.1.0 .
#
# Runs as uid/gid 10001 and writes nothing outside /tmp, so it works with
# readOnlyRootFilesystem and an emptyDir on /tmp (see deploy/base). No HEALTHCHECK:
# Kubernetes ignores it and probes the standard gRPC health service natively; with plain
# Docker use `grpcurl -plaintext localhost:50053 grpc.health.v1.Health/Check`.
#
# Base images are pinned by exact tag. Pin them by digest as well where the registry is
# reachable: docker buildx imagetools inspect python:3.11.15-slim-bookworm

# ---- build: wheels for adrec and every pinned dependency -------------------------------
FROM python:3.11.15-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# Only what the package build reads (see .dockerignore): the lock, the metadata, the sources.
# Every dependency comes at the version the lock file pins, the one the tests ran with.
COPY requirements/services.txt ./requirements/
RUN pip wheel --wheel-dir /wheels -r requirements/services.txt \
    && cp requirements/services.txt /wheels/requirements.txt
COPY pyproject.toml README.md ./
COPY adrec ./adrec
COPY services ./services
COPY jobs ./jobs
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---- runtime ---------------------------------------------------------------------------
FROM python:3.11.15-slim-bookworm

LABEL org.opencontainers.image.title="adrec-services" \
      org.opencontainers.image.description="adrec recall, ranking and gateway gRPC services" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp

# A venv without pip; the wheels are bind-mounted from the build stage, so they add no layer.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv --without-pip /opt/venv \
    && pip --python /opt/venv/bin/python install --no-cache-dir --no-index \
        --find-links /wheels -r /wheels/requirements.txt adrec \
    && groupadd --system --gid 10001 adrec \
    && useradd --system --uid 10001 --gid adrec --no-create-home --home-dir /tmp \
        --shell /usr/sbin/nologin adrec

USER 10001:10001
WORKDIR /tmp

# gRPC: recall 50051, ranking 50052, gateway 50053, events 50054, admin 50055; Prometheus
# /metrics: 9464.
EXPOSE 50051 50052 50053 50054 50055 9464

ENTRYPOINT ["adrec"]
CMD ["serve", "--help"]
