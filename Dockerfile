# payler: run it with your broker and storage given by environment variables.
#   docker build -t payler .
#   docker run -e BROKER_URL=amqp://user:pass@rabbit/ -e MONGODB_URL=mongodb://mongo/payler payler
# Without MONGODB_URL or PAYLER_STORAGE_URL, the spool is the embedded SQLite file
# /data/payler-spool.db: mount a volume on /data to keep it across containers.
# Your own configuration: mount it on /configuration.yaml.
# Metrics, probes and the admin API: port 8000 (loopback in the container unless
# PAYLER_HTTP_HOST=0.0.0.0 and PAYLER_HTTP_TOKEN=... are set). HEALTHCHECK probes /healthz.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PAYLER_HTTP_PORT=8000

WORKDIR /src
COPY pyproject.toml README.md ./
COPY payler ./payler
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --no-create-home --home-dir /data payler \
    && mkdir -p /data \
    && chown payler /data
COPY configuration.yaml /configuration.yaml

# The embedded spool's default path (sqlite:///payler-spool.db) is relative to /data.
WORKDIR /data
VOLUME ["/data"]
USER payler
EXPOSE 8000
# The HTTP server (PAYLER_HTTP_PORT, on 127.0.0.1 unless PAYLER_HTTP_HOST says otherwise: then
# set PAYLER_HTTP_TOKEN too) answers /healthz while the event loop runs.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"PAYLER_HTTP_PORT\", \"8000\")}/healthz', timeout=2)"]
ENTRYPOINT ["payler"]
CMD ["--config-file", "/configuration.yaml"]
