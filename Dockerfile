# payler: run it with your broker and storage given by environment variables.
#   docker build -t payler .
#   docker run -e BROKER_URL=amqp://user:pass@rabbit/ -e MONGODB_URL=mongodb://mongo/payler payler
# Without MONGODB_URL or PAYLER_STORAGE_URL, the spool is the embedded SQLite file
# /data/payler-spool.db: mount a volume on /data to keep it across containers.
# Your own configuration: mount it on /configuration.yaml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

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
ENTRYPOINT ["payler"]
CMD ["--config-file", "/configuration.yaml"]
