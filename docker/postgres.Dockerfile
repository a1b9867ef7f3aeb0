# PostgreSQL 15 from Debian's packages on the local Debian base (docker/build.sh makes both).
# The first start makes the cluster in the volume (docker/base/postgres-entrypoint.sh): the user
# and database POSTGRES_USER owns, password auth (scram-sha-256) for every TCP client.
ARG BASE=shedshare/debian:bookworm
FROM ${BASE}
# Debian's package would make a cluster of its own in /var/lib/postgresql/15/main: ours lives in
# the volume instead, made by the entrypoint.
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql-common >/dev/null \
    && sed -i 's/^#\?\s*create_main_cluster.*/create_main_cluster = false/' /etc/postgresql-common/createcluster.conf \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql-15 >/dev/null \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/lib/postgresql/data /run/postgresql \
    && chown postgres:postgres /var/lib/postgresql/data /run/postgresql
ENV PATH=/usr/lib/postgresql/15/bin:$PATH PGDATA=/var/lib/postgresql/data/pgdata
COPY postgres-entrypoint.sh /usr/local/bin/
USER postgres
VOLUME /var/lib/postgresql/data
EXPOSE 5432
# A fast shutdown (SIGINT) ends the clients' sessions and checkpoints; the default SIGTERM waits
# for every client to leave, and the engine's SIGKILL after 10 s would leave a crash to recover.
STOPSIGNAL SIGINT
ENTRYPOINT ["postgres-entrypoint.sh"]
