# PostgreSQL for the compose stack where no image registry is reachable (else use postgres:16-alpine):
# Debian bookworm's postgresql-15 on the locally bootstrapped base. Honours POSTGRES_USER,
# POSTGRES_PASSWORD and POSTGRES_DB like the official image, data in /var/lib/postgresql/data.
#   docker build -f scripts/docker/postgres.Dockerfile -t brainscan-postgres:15 scripts/docker
ARG BASE_IMAGE=brainscan-base:bookworm
FROM ${BASE_IMAGE}
RUN mkdir -p /etc/postgresql-common \
    && echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.conf \
    && apt-get update \
    && apt-get install -y --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
    && chown postgres:postgres /var/lib/postgresql/data /var/run/postgresql \
    && chmod 0700 /var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint
ENV PATH=/usr/lib/postgresql/15/bin:$PATH PGDATA=/var/lib/postgresql/data
USER postgres
VOLUME ["/var/lib/postgresql/data"]
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["postgres-entrypoint"]
