# syntax=docker/dockerfile:1
#
# cohere-gateway container image.
#
#   docker build -t cohere-gateway .
#   docker run --rm -p 8080:8080 \
#     -v "$PWD/config.yaml:/etc/cohere-gateway/config.yaml:ro" \
#     -e COHERE_API_KEY -e BILLING_GATEWAY_KEY \
#     cohere-gateway
#
# The config is read from $GATEWAY_CONFIG (/etc/cohere-gateway/config.yaml):
# mount it there (a ConfigMap in Kubernetes), and the token as an env
# variable or a file (upstream.token_file, e.g. /run/secrets/cohere-token).
# The container always listens on 8080 (--port overrides server.port), so
# EXPOSE and HEALTHCHECK hold whatever the config says.
#
# The record store (docs/design.md §8: who created which batch, Idempotency-Key
# records) lives in the volume /var/lib/cohere-gateway, the working
# directory, so the default store.path ./cohere-gateway.db lands there and
# survives a new container. Give it a named volume (or a host directory
# writable by uid 10001):
#   docker run ... -v cohere-gateway-store:/var/lib/cohere-gateway cohere-gateway

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder: build the wheel and install it with its dependencies into a venv.
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Every package at the version the tests passed on (.ci/constraints.txt, the lock),
# the build tools included: a registry release cannot change what an image holds.
COPY pyproject.toml README.md .ci/constraints.txt ./
COPY gateway ./gateway
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install -c constraints.txt pip setuptools \
    && /opt/venv/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /wheels . \
    && /opt/venv/bin/pip install -c constraints.txt /wheels/cohere_gateway-*.whl

# --- runtime: the venv only; no compiler, no pip cache, no sources.
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="cohere-gateway" \
      org.opencontainers.image.description="A caching, authenticating gateway in front of Cohere's batch API."
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GATEWAY_CONFIG=/etc/cohere-gateway/config.yaml
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --no-create-home --shell /usr/sbin/nologin gateway \
    && mkdir -p /etc/cohere-gateway /var/lib/cohere-gateway \
    && chown 10001:10001 /var/lib/cohere-gateway \
    && chmod 0750 /var/lib/cohere-gateway
COPY --from=builder /opt/venv /opt/venv
# The store's directory must exist before start (a missing one is an error,
# not silently created), so the image makes it and owns it to the runtime
# user; a named volume starts as a copy of it, ownership included.
WORKDIR /var/lib/cohere-gateway
VOLUME ["/var/lib/cohere-gateway"]
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
# Exec form: the gateway is PID 1 and receives SIGTERM (graceful stop) and SIGHUP (reload) itself.
CMD ["cohere-gateway", "--port", "8080"]
