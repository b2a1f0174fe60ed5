# syntax=docker/dockerfile:1.7
#
# adrec job image: the batch job (spark-submit ... local:///opt/adrec/jobs/main.py) and the
# Spark driver and executor pods it starts on Kubernetes; also the stream job
# (`adrec stream run`, Spark in local mode in one pod).
#
# Python 3.11 + Java 17 (Temurin JRE) + Spark from the pinned `pyspark` wheel, which ships
# the Spark jars including the Kubernetes resource manager; SPARK_HOME points into it so
# `spark-submit`, the driver and the executors all run the very Spark the job was tested
# with. Build from the repository root (BuildKit):
#
#   docker build -f deploy/images/job.Dockerfile -t adrec-job:0.1.0 .
#
# The entrypoint (deploy/images/spark-entrypoint.sh) speaks Spark's container contract:
# `driver ...` (cluster mode, e.g. the Spark Operator), `executor` (pods a driver starts),
# anything else runs as given under tini (the CronJob's spark-submit in client mode, the
# stream job's `adrec stream run`).
# Runs as uid/gid 10001; writes only to /tmp and /opt/adrec/work (emptyDirs in Kubernetes),
# so it works with readOnlyRootFilesystem.
#
# Base images are pinned by exact tag. Pin them by digest as well where the registry is
# reachable: docker buildx imagetools inspect <image>

# ---- Java 17: the Temurin JRE, copied into the Python image ----------------------------
FROM eclipse-temurin:17.0.17_10-jre-noble AS jre

# ---- build: wheels for adrec[job] (pyspark comes as an sdist and is built here) --------
FROM python:3.11.15-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# Every dependency at the version the lock file pins, the one the tests ran with.
COPY requirements/job.txt ./requirements/
RUN pip wheel --wheel-dir /wheels -r requirements/job.txt \
    && cp requirements/job.txt /wheels/requirements.txt
COPY pyproject.toml README.md ./
COPY adrec ./adrec
COPY services ./services
COPY jobs ./jobs
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---- runtime ---------------------------------------------------------------------------
FROM python:3.11.15-slim-bookworm

LABEL org.opencontainers.image.title="adrec-job" \
      org.opencontainers.image.description="adrec Spark batch job (driver and executors)" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV JAVA_HOME=/opt/java/openjdk \
    SPARK_HOME=/opt/venv/lib/python3.11/site-packages/pyspark \
    PYSPARK_PYTHON=/opt/venv/bin/python \
    PYSPARK_DRIVER_PYTHON=/opt/venv/bin/python \
    PATH=/opt/venv/bin:/opt/java/openjdk/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp

# tini reaps the Python workers Spark forks; procps gives Spark's scripts `ps`.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini procps \
    && rm -rf /var/lib/apt/lists/*

COPY --from=jre /opt/java/openjdk /opt/java/openjdk

RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv --without-pip /opt/venv \
    && pip --python /opt/venv/bin/python install --no-cache-dir --no-index \
        --find-links /wheels -r /wheels/requirements.txt 'adrec[job]' \
    && groupadd --system --gid 10001 adrec \
    && useradd --system --uid 10001 --gid adrec --no-create-home --home-dir /tmp \
        --shell /usr/sbin/nologin adrec \
    && mkdir -p /opt/adrec/work \
    && chown 10001:10001 /opt/adrec/work

# The spark-submit entry point, as `local:///opt/adrec/jobs/main.py`, and the driver's log
# configuration the entrypoint points spark-submit at.
COPY jobs/main.py /opt/adrec/jobs/main.py
COPY jobs/log4j2.properties /opt/adrec/jobs/log4j2.properties
COPY --chmod=0755 deploy/images/spark-entrypoint.sh /opt/adrec/entrypoint.sh

USER 10001:10001
# Spark executors keep fetched files in their working directory.
WORKDIR /opt/adrec/work

ENTRYPOINT ["/opt/adrec/entrypoint.sh"]
CMD ["spark-submit", "--version"]
