# syntax=docker/dockerfile:1
# llm-proxy container image: `docker build -t llm-proxy .`, then
#   docker run -p 8080:8080 -e MANAGEMENT_TOKEN=... -v llm-proxy-data:/app/data llm-proxy
# The default database, event log and tiktoken encodings (downloaded once, for usage
# estimates) live in the /app/data volume; set DATABASE_URL to a
# postgres:// DSN (and ENCRYPTION_KEY) for production, as docker-compose.yml and
# the Helm chart in deploy/helm/ do.

# ---- builder: the project wheel and the wheels of its dependencies
FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY llm_proxy ./llm_proxy
RUN pip wheel -c constraints.txt --wheel-dir /wheels .

# ---- runtime: only the installed wheels, run as the unprivileged user llmproxy
FROM python:3.11-slim

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LISTEN_ADDR=:8080 \
    DATABASE_URL=sqlite:////app/data/llm-proxy.db
# A folder, not a secret: hadolint takes the TOKEN in its name for one.
# hadolint ignore=DL3064
ENV TIKTOKEN_CACHE_DIR=/app/data/tiktoken

RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels /wheels/llm_proxy-*.whl

RUN groupadd --system --gid 10001 llmproxy \
    && useradd --system --uid 10001 --gid llmproxy --home-dir /app --shell /usr/sbin/nologin llmproxy \
    && mkdir -p /app/data \
    && chown -R llmproxy:llmproxy /app

WORKDIR /app
# Numeric, so that runtimes can check it is not root (runAsNonRoot).
USER 10001:10001
VOLUME /app/data
EXPOSE 8080

# The slim image has no curl: ask /live with the standard library.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/live', timeout=4)"]

ENTRYPOINT ["llm-proxy"]
CMD ["serve"]
