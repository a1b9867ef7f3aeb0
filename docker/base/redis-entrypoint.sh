#!/bin/sh
# The password goes into a configuration file only the redis user reads, not onto the command
# line where every process of the container would see it.
set -eu
: "${REDIS_PASSWORD:?set REDIS_PASSWORD}"
conf=$(mktemp)
cat >"$conf" <<CONF
bind * -::*
port 6379
protected-mode no
requirepass $REDIS_PASSWORD
dir /data
appendonly yes
appendfsync everysec
save 300 1
logfile ""
CONF
unset REDIS_PASSWORD
exec redis-server "$conf" "$@"
