# procbridge: the HTTP service (default command) and, with another command, the Dask scheduler or a
# Dask worker with the same code (docker-compose.yml, profile "dask"). See docs/container.md.
# No `# syntax=` line on purpose: nothing here needs a newer Dockerfile frontend than the one built into
# every engine, and naming one makes BuildKit pull it from a registry before the build can start.

# -- build: a virtual environment from the pinned lock, then the project itself ---------------------
FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY requirements.lock ./
# --no-deps: exactly what the lock pins, nothing resolved at build time.
RUN /opt/venv/bin/pip install --no-deps --require-virtualenv -r requirements.lock
COPY pyproject.toml README.md ./
# Every package pyproject.toml lists ([tool.setuptools] packages); scripts/container-smoke builds
# exactly what these lines copy, so a package missing here fails CI.
COPY procbridge ./procbridge
COPY service ./service
COPY workers ./workers
COPY bench ./bench
# --no-deps, so no extra to name: requirements.lock above already holds the client's dependency (httpx)
# and the server's (the `server` extra of pyproject.toml), exactly pinned.
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation . \
    && /opt/venv/bin/python -m compileall -q /opt/venv

# -- runtime: slim base, tini as PID 1, a non-root user, the venv and nothing else --------------------
FROM python:3.11-slim-bookworm
# tini: PID 1 forwards SIGTERM to the server (which drains) and reaps orphaned processes.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 procbridge \
    && useradd --system --uid 10001 --gid procbridge --home-dir /app --shell /usr/sbin/nologin procbridge \
    && mkdir -p /app /data \
    && chown procbridge:procbridge /app /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PROCBRIDGE_HOST=0.0.0.0 \
    PROCBRIDGE_PORT=8080 \
    PROCBRIDGE_STORE=/data/procbridge.db
WORKDIR /app
USER 10001:10001
EXPOSE 8080
# The SQLite job store lives here; mount a volume to keep jobs across containers.
VOLUME ["/data"]
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["/opt/venv/bin/python", "-m", "service.healthcheck"]
ENTRYPOINT ["/usr/bin/tini", "--", "/opt/venv/bin/procbridge"]
CMD ["serve"]
