# syntax=docker/dockerfile:1
# auth-sidecar container image.
#
#   docker build -t auth-sidecar:0.1.0 .
#   docker run --read-only -v "$PWD/sidecar.yaml:/etc/auth-sidecar/config.yaml:ro" \
#     -e OIDC_CLIENT_SECRET -e SESSION_KEY -p 4180:4180 -p 9180:9180 auth-sidecar:0.1.0
#
# Two stages: the first builds wheels for the sidecar and every dependency, the second
# installs only those wheels, so the final image carries no compiler, no build tools and no
# source tree. Both stages use the same base, pinned to a full patch version; bump it on
# purpose (and rebuild for security fixes), never by accident.

FROM python:3.11.11-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Every dependency ships manylinux wheels for amd64 and arm64, so no compiler is installed
# here either; a platform without wheels would need `apt-get install build-essential` in
# this stage only.
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
RUN pip wheel --wheel-dir /wheels .


FROM python:3.11.11-slim-bookworm

LABEL org.opencontainers.image.title="auth-sidecar" \
      org.opencontainers.image.description="OpenID Connect auth sidecar and reverse proxy" \
      org.opencontainers.image.licenses="Apache-2.0"

# Read-only root filesystem: Python writes no .pyc files and nothing else is written outside
# /tmp (declared below; in Kubernetes mount an emptyDir there).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TMPDIR=/tmp \
    AUTH_SIDECAR_CONFIG=/etc/auth-sidecar/config.yaml

# Install from the first stage's wheels only: --no-index means nothing is fetched or built.
# The wheels are bind-mounted (BuildKit), so they do not end up in a layer of the image.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels auth-sidecar \
 && groupadd --system --gid 10001 sidecar \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin sidecar \
 && mkdir -p /etc/auth-sidecar

# Numeric so that Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER 10001:10001
WORKDIR /tmp
VOLUME /tmp

# 4180: the proxy (server.listen); 9180: /healthz /readyz /metrics (management.listen).
EXPOSE 4180 9180

# The sidecar is PID 1 and handles SIGTERM itself: /readyz turns 503, it keeps serving for
# server.shutdown_delay, drains in-flight requests for server.shutdown_grace and exits 0.
# Exec form (no shell in between) so the signal reaches it.
STOPSIGNAL SIGTERM
ENTRYPOINT ["auth-sidecar"]
CMD ["run"]
