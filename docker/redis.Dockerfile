# Redis from Debian's package on the local Debian base (docker/build.sh makes both): on every
# address of the container's networks, with a password (REDIS_PASSWORD), and persistent in its
# volume (an append-only file, fsync'd each second, plus snapshots).
ARG BASE=shedshare/debian:bookworm
FROM ${BASE}
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data && chown redis:redis /data
COPY redis-entrypoint.sh /usr/local/bin/
USER redis
WORKDIR /data
VOLUME /data
EXPOSE 6379
ENTRYPOINT ["redis-entrypoint.sh"]
