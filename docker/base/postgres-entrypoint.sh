#!/bin/sh
# The first start (no cluster in the volume yet): initdb with POSTGRES_USER's password, create
# POSTGRES_DB, all in a folder beside $PGDATA that becomes it only once complete, so that a start
# cut short is made again from scratch rather than taken for a cluster. Then the server, on
# every address of the container's networks, password auth for all of them.
set -eu
: "${POSTGRES_USER:?set POSTGRES_USER}" "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
POSTGRES_DB=${POSTGRES_DB:-$POSTGRES_USER}
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    fresh=$PGDATA.init
    rm -rf "$fresh"
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    # Local (socket) connections inside this container are trusted; every TCP one gives a password.
    initdb --pgdata="$fresh" --username="$POSTGRES_USER" --pwfile="$pwfile" --encoding=UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >>"$fresh/pg_hba.conf"
    # On the socket only, so that no client (nor a health check over TCP) finds it half made.
    pg_ctl --pgdata="$fresh" --options="-c listen_addresses=''" --wait --silent start
    if [ "$POSTGRES_DB" != postgres ]; then
        createdb --username="$POSTGRES_USER" --owner="$POSTGRES_USER" "$POSTGRES_DB"
    fi
    pg_ctl --pgdata="$fresh" --mode=fast --wait --silent stop
    mv "$fresh" "$PGDATA"
    echo "postgres-entrypoint: made the cluster in $PGDATA with database $POSTGRES_DB"
fi
exec postgres -D "$PGDATA" -c listen_addresses='*' "$@"
