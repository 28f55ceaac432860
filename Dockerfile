# syntax=docker/dockerfile:1
# mqfast gateway image: docker build -t necpgame/message-queue-service:latest .
#
# Two stages so that the C compiler the Cython extension needs never reaches the image that runs.
# Both stages use the same base image: the venv built in the first is copied as is into the second,
# and its interpreter symlinks (/usr/local/bin/python3.11) must resolve to the same Python there.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# Debian package versions are not pinned: bookworm only takes security fixes, and a pinned
# version disappears from the mirrors as soon as one is published, breaking the build.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv

WORKDIR /src
# Only what the build reads (setup.py compiles src/mqfast/_core.pyx; pyproject names README.md as
# the long description), so that editing tests or docs does not invalidate this layer.
COPY pyproject.toml setup.py README.md ./
COPY src ./src
# Not editable, so the compiled _core lands inside /opt/venv with everything else; the cluster
# extras bring confluent-kafka (librdkafka ships inside its wheel), asyncpg and redis. Versions
# come from the ranges in pyproject.toml: the project has no lock file to pin them with.
# hadolint ignore=DL3013
RUN pip install ".[cluster]" \
    && python -c "import mqfast._core"


FROM ${PYTHON_IMAGE} AS runtime

# The defaults of the code listen on loopback only, which nothing outside a container can reach.
# The debug listener stays on loopback: it serves stacks and heap dumps and must not be published
# (reach it with `docker exec`, or set PPROF_ADDR= to turn it off).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MESSAGE_QUEUE_HOST=0.0.0.0 \
    MESSAGE_QUEUE_PORT=8087 \
    METRICS_ADDR=:9097 \
    PPROF_ADDR=127.0.0.1:6067 \
    MESSAGE_QUEUE_DATA_DIR=/var/lib/mqfast

# A fixed numeric uid so that Kubernetes' runAsNonRoot can verify it and volume ownership is
# predictable across image rebuilds.
RUN groupadd --system --gid 10001 mqfast \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/mqfast --no-create-home \
        --shell /usr/sbin/nologin mqfast \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/mqfast

COPY --from=build /opt/venv /opt/venv

WORKDIR /var/lib/mqfast
USER 10001:10001
# MESSAGE_QUEUE_DATA_DIR: the embedded engine's database must outlive the container.
VOLUME ["/var/lib/mqfast"]

EXPOSE 8087 9097

# mqfast drains in-flight requests on SIGTERM within MESSAGE_QUEUE_SHUTDOWN_TIMEOUT (30 s), so
# `docker stop` needs a longer timeout than its 10 s default: `docker stop -t 45`.
STOPSIGNAL SIGTERM

# The slim image has no curl; urlopen raises (exit 1) on a refused connection or a non-2xx answer.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('MESSAGE_QUEUE_PORT', '8087') + '/health/live', timeout=2)"]

ENTRYPOINT ["mqfast"]
CMD ["serve"]
