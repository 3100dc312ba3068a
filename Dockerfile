# anonproxy: DICOM C-STORE de-identifying proxy.
#
#   docker build -t anonproxy .
#   docker run -p 11112:11112 -v anonproxy-state:/var/lib/anonproxy \
#       -v "$PWD/my.yaml:/etc/anonproxy/anonproxy.yaml:ro" anonproxy
#
# State (spool, quarantine, secret.key, audit trail) lives in the /var/lib/anonproxy volume.
# The pseudonymisation secret comes from ANONPROXY_SECRET_FILE (e.g. a Docker secret),
# ANONPROXY_SECRET, or /var/lib/anonproxy/secret.key (created by serve on first run): back it up.

# The base image, pinned by digest (the multi-platform index of the tag), so that a rebuild uses
# the same system it was tested on. To move to a newer one, read the tag's current digest
# (`docker buildx imagetools inspect python:3.11-slim-bookworm`) and replace it here.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91

# --- build: a self-contained virtual environment in /opt/anonproxy ---------------------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/anonproxy

WORKDIR /src

# Dependencies first, in their own layer (rebuilt only when the lock changes): exactly the
# versions of the lock, each file checked against its sha256 there (pip refuses any package
# that is not in the lock or does not match). tools/lock-requirements makes the locks from
# pyproject.toml; they include setuptools, which builds anonproxy below.
# requirements-postgresql.lock adds the postgresql extra (psycopg, LGPL-3.0) for
# state.backend: postgresql: --build-arg LOCK=requirements-postgresql.lock.
ARG LOCK=requirements.lock
COPY ${LOCK} requirements.lock
RUN /opt/anonproxy/bin/pip install --no-cache-dir --require-hashes --only-binary=:all: \
        -r requirements.lock

# Then the package itself (with its package data: default.yaml, deid/_standard/*), built with
# the locked setuptools and nothing else fetched.
COPY pyproject.toml ./
COPY anonproxy/ anonproxy/
RUN /opt/anonproxy/bin/pip install --no-cache-dir --no-deps --no-build-isolation . \
    && /opt/anonproxy/bin/pip check \
    && /opt/anonproxy/bin/anonproxy --version

# --- runtime ----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="anonproxy" \
      org.opencontainers.image.description="DICOM C-STORE proxy that de-identifies under PS3.15 Annex E and forwards to a research PACS" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PATH=/opt/anonproxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# A fixed, unprivileged UID/GID so that volume and secret ownership can be set on the host.
RUN groupadd --system --gid 10001 anonproxy \
    && useradd --system --uid 10001 --gid anonproxy --no-create-home \
       --home-dir /var/lib/anonproxy --shell /usr/sbin/nologin anonproxy \
    && install -d -o anonproxy -g anonproxy -m 0700 /var/lib/anonproxy \
    && install -d -m 0755 /etc/anonproxy

COPY --from=build /opt/anonproxy /opt/anonproxy
COPY config/anonproxy.example.yaml /etc/anonproxy/anonproxy.yaml

USER 10001:10001
WORKDIR /var/lib/anonproxy
VOLUME ["/var/lib/anonproxy"]

EXPOSE 11112

# anonproxy stops gracefully on SIGTERM: it closes the SCP, lets the forward workers finish the
# instance in flight and exits; unsent instances stay in the spool for the next start.
STOPSIGNAL SIGTERM

# Healthy when the admin endpoint's /readyz answers 200: the spool and the audit file are
# writable, the disk has more free space than storage.min_free_bytes and no destination queue is
# older than admin.max_queue_age_s (urlopen raises on 503, and python exits 1). Adjust the port
# if admin.port is changed; admin.enabled must stay true.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=4)"]

CMD ["anonproxy", "serve", "--config", "/etc/anonproxy/anonproxy.yaml"]
