# Redis for the compose stack where no image registry is reachable (else use redis:7-alpine):
# Debian bookworm's redis-server (7.0) on the locally bootstrapped base, data in /data.
#   docker build -f scripts/docker/redis.Dockerfile -t brainscan-redis:7 scripts/docker
ARG BASE_IMAGE=brainscan-base:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data && chown redis:redis /data
USER redis
WORKDIR /data
VOLUME ["/data"]
EXPOSE 6379
CMD ["redis-server", "--protected-mode", "no"]
