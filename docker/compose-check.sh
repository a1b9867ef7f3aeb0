#!/usr/bin/env bash
# The compose stack, end to end, as a user runs it: the images made here from Debian's packages
# (docker/build.sh), `up` under a project name of its own, a job submitted through the REST API
# with the bootstrap's renter key runs in a real container on the compose agent, the portal lets
# the bootstrap's owner log in; then `down` and `up` again: the job, the logins and the key are
# still there and the agent comes back as the same unit without enrolling again; `down -v` at the
# end (and on any failure, after printing the compose logs' tail). The seconds each phase took
# are printed last as one JSON line.
#
#   sudo bash docker/engine.sh up && sudo bash docker/compose-check.sh
#
# Needs the engine, the local registry and the test image of engine.sh; uses `docker compose`
# where the engine has it, else Debian's docker-compose (installed when missing).
set -euo pipefail
shopt -s inherit_errexit

HERE=$(cd "$(dirname "$0")" && pwd)
eval "$(bash "$HERE/engine.sh" env)"
PROJECT=shedshare-check-$$
BASE_URL=
TIMEOUT_S=${COMPOSE_CHECK_TIMEOUT_S:-300}  # the longest any one wait below may take
WORK=$(mktemp -d)
export SHEDSHARE_PRIVATE_REGISTRY=$SHEDSHARE_TEST_REGISTRY SHEDSHARE_AGENT_REGISTRIES=$SHEDSHARE_TEST_REGISTRY
export SHEDSHARE_AGENT_WORK_DIR=/var/lib/shedshare-compose/$PROJECT
declare -A TIMINGS=()

say() { echo "compose-check: $*" >&2; }
fail() { say "FAILED: $*"; exit 1; }

if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
else
    command -v docker-compose >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker-compose >/dev/null
    COMPOSE=(docker-compose)
fi
compose() { "${COMPOSE[@]}" --project-name "$PROJECT" --file "$HERE/compose.yaml" "$@"; }

JOBS=()
cleanup() {
    local status=$?
    if [ "$status" -ne 0 ]; then
        say "the last lines of the stack's logs:"
        compose logs --no-color --tail 60 >&2 || true
    fi
    compose down --volumes --remove-orphans --timeout 20 >/dev/null 2>&1 || true
    # A job container the agent did not get to remove (it was stopped first): only this run's.
    for job in "${JOBS[@]}"; do
        docker ps -aq --filter "label=shedshare.job=$job" | xargs -r docker rm -f >/dev/null 2>&1 || true
    done
    rm -rf "$WORK" "$SHEDSHARE_AGENT_WORK_DIR"
    rmdir --ignore-fail-on-non-empty "$(dirname "$SHEDSHARE_AGENT_WORK_DIR")" 2>/dev/null || true
    exit "$status"
}
trap cleanup EXIT

now() { date +%s.%N; }
took() { python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))" "$1" "$(now)"; }

# wait_for WHAT COMMAND...: polls every second until the command succeeds, at most TIMEOUT_S.
wait_for() {
    local what=$1 deadline=$((SECONDS + TIMEOUT_S))
    shift
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || fail "$what: not within ${TIMEOUT_S} s"
        sleep 1
    done
}

json() { python3 -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }
api() { curl -sf -H "Authorization: Bearer $API_KEY" -H 'Content-Type: application/json' "$@"; }
job_state() { api "$BASE_URL/api/v1/jobs/$1" | json state; }
job_is() { [ "$(job_state "$1")" = "$2" ]; }
job_ended() { case $(job_state "$1") in succeeded | failed | cancelled | lost) true ;; *) false ;; esac; }
bootstrap_done() {
    local id
    id=$(compose ps -q bootstrap)
    [ "$(docker inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$id")" = "exited 0" ]
}
unit() {  # the unit's status and enrolment time, as the server has them
    compose exec -T web python manage.py shell -c \
        "from nodes.models import Unit; u = Unit.objects.get(); print(u.status, u.enrolled_at.isoformat())"
}
unit_online() { unit | grep -q '^online '; }

up_and_ready() {  # up_and_ready PHASE: start the stack, then wait for the server, the keys and the shed
    local began
    began=$(now)
    compose up -d --no-build >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log" >&2; fail "compose up"; }
    wait_for "the web server's /healthz" curl -sf "$BASE_URL/healthz"
    wait_for "the bootstrap" bootstrap_done
    compose logs --no-color bootstrap >"$WORK/bootstrap.log"
    API_KEY=$(sed -n 's/.*SHEDSHARE_API_KEY=\([^ ]*\).*/\1/p' "$WORK/bootstrap.log" | tail -1 | tr -d '\r')
    OWNER_PASSWORD=$(sed -n 's/.*owner \/ \([^ ]*\) .*/\1/p' "$WORK/bootstrap.log" | tail -1)
    [ -n "$API_KEY" ] && [ -n "$OWNER_PASSWORD" ] || fail "no renter key or owner password in the bootstrap's log"
    wait_for "the API with the renter's key" api "$BASE_URL/api/v1/jobs"
    wait_for "the shed online" unit_online
    TIMINGS[$1]=$(took "$began")
}

portal_login() {  # the login page answers, and the owner logs in with the bootstrap's password
    local jar=$WORK/cookies csrf status
    rm -f "$jar"
    [ "$(curl -s -o "$WORK/login.html" -w '%{http_code}' -c "$jar" "$BASE_URL/accounts/login/")" = 200 ] ||
        fail "the portal's login page"
    csrf=$(sed -n 's/.*name="csrfmiddlewaretoken" value="\([^"]*\)".*/\1/p' "$WORK/login.html" | head -1)
    status=$(curl -s -o /dev/null -w '%{http_code} %{redirect_url}' -b "$jar" -c "$jar" \
        --data-urlencode "csrfmiddlewaretoken=$csrf" --data-urlencode username=owner \
        --data-urlencode "password=$OWNER_PASSWORD" "$BASE_URL/accounts/login/")
    case $status in 302*/portal/*) ;; *) fail "the owner's login: $status" ;; esac
}

run_job() {  # run_job MARKER: a job in a real container, to success; its id in JOB
    local job began
    began=$(now)
    job=$(api -X POST "$BASE_URL/api/v1/jobs" -d "{\"image\": \"$SHEDSHARE_TEST_IMAGE\", \"gpu_count\": 1,
        \"jurisdictions\": [\"DE\"], \"command\": [\"sh\", \"-c\", \"echo $1 in a container; id -u\"]}" | json id)
    JOBS+=("$job")
    wait_for "job $job to end" job_ended "$job"
    job_is "$job" succeeded || fail "job $job: $(api "$BASE_URL/api/v1/jobs/$job")"
    wait_for "job $job's log" sh -c "curl -sf -H 'Authorization: Bearer $API_KEY' -H 'Accept: text/plain' \
        '$BASE_URL/api/v1/jobs/$job/logs' | grep -q '$1 in a container'"
    api -H 'Accept: text/plain' "$BASE_URL/api/v1/jobs/$job/logs" >"$WORK/job.log"
    # As the container's user (nobody), not as the agent's (root).
    grep -qx '65534' "$WORK/job.log" || fail "job $job's log: $(cat "$WORK/job.log")"
    TIMINGS[job_$1]=$(took "$began")
    JOB=$job
}

started=$(now)
began=$(now)
bash "$HERE/build.sh" >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log" >&2; fail "docker/build.sh"; }
grep '^build:' "$WORK/build.log" >&2 || true
TIMINGS[build]=$(took "$began")

PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export SHEDSHARE_WEB_PORT=$PORT
BASE_URL=http://127.0.0.1:$PORT
say "project $PROJECT on $BASE_URL"

up_and_ready first_up_to_ready
enrolled=$(unit | cut -d' ' -f2)
first_key=$API_KEY
run_job first-job
first_job=$JOB
portal_login
say "first job $first_job succeeded in a container; the owner logged in"

began=$(now)
compose down --timeout 20 >/dev/null 2>&1
TIMINGS[down]=$(took "$began")
up_and_ready second_up_to_ready
[ "$API_KEY" = "$first_key" ] || fail "the bootstrap made a new renter key after down/up"
job_is "$first_job" succeeded || fail "job $first_job is not there after down/up"
portal_login
[ "$(unit | cut -d' ' -f2)" = "$enrolled" ] || fail "the shed enrolled again after down/up"
compose logs --no-color agent >"$WORK/agent.log"
grep -q 'enrolled already' "$WORK/agent.log" && ! grep -q 'Enrolled unit' "$WORK/agent.log" ||
    fail "the agent did not keep its enrolment"
run_job second-job
second_job=$JOB
say "after down/up: the first job, the logins and the key kept; the shed the same unit; job $second_job succeeded"

TIMINGS[total]=$(took "$started")
python3 -c 'import json, sys; print(json.dumps({"compose_check": {k: float(v) for k, v in zip(sys.argv[1::2], sys.argv[2::2])}}))' \
    $(for key in build first_up_to_ready job_first-job down second_up_to_ready job_second-job total; do
        echo "$key ${TIMINGS[$key]}"
    done)
